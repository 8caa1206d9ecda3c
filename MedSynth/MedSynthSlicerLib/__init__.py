"""Everything of the MedSynth Slicer module except the widgets: runs without Qt.

* :mod:`.logic` - :class:`WorkflowLogic`, the facade the widget calls (rating and export inside);
* :mod:`.label_segmentation` - input, prepare, the label segmentation (sync, lock, undo);
* :mod:`.tumour_tools` - MedSynthLib edits from the panel and the handles;
* :mod:`.generate` - generate and preview on the scene, through the worker;
* :mod:`.review` - the four linked review views;
* :mod:`.jobs` - the client of the backend worker (one process for generate, preview, export);
* :mod:`.protocol` - the typed JSON-lines messages and array files both sides speak;
* ``worker.py`` - the worker, run in the backend's Python (``PythonSlicer``);
* :mod:`.mrml` - volumes, grids, segmentations <-> MedSynthLib label maps;
* :mod:`.process` - process helpers (alive, group, the backend's Python);
* :mod:`.signals` - pure-Python signals;
* :mod:`.environment` - MedSynthLib location, dependencies, torch device detection;
* :mod:`.parameters` - parameter dataclasses and choice lists (derived from MedSynthLib).

Tested on the PyPI ``slicer-core`` libraries (``Testing/test_slicer_*.py``).
"""

from .errors import CancelledError, WorkflowError
from .parameters import GenerateOptions, TumourParameters
from .signals import Signal

__all__ = ["CancelledError", "GenerateOptions", "Signal", "TumourParameters", "WorkflowError"]
