"""Everything of the MedSynth Slicer module except the widgets: runs without Qt.

* :mod:`.logic` - :class:`WorkflowLogic`, the workflow on an MRML scene;
* :mod:`.mrml` - volumes, grids, segmentations <-> MedSynthLib label maps;
* :mod:`.process` - the background process runner (thread + poll, process-tree cancel);
* :mod:`.signals` - pure-Python signals;
* :mod:`.environment` - MedSynthLib location, dependencies, torch device detection;
* :mod:`.parameters` - parameter dataclasses and choice lists;
* :mod:`.render` - offscreen VTK rendering of the scene (README figure);
* ``run_cli.py`` / ``preview_worker.py`` - scripts run in the backend process.

Tested on the PyPI ``slicer-core`` libraries (``Testing/test_slicer_*.py``).
"""

from .errors import CancelledError, WorkflowError
from .parameters import GenerateOptions, TumourParameters
from .signals import Signal

__all__ = ["CancelledError", "GenerateOptions", "Signal", "TumourParameters", "WorkflowError"]
