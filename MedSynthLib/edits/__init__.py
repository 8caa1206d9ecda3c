"""Tumour edits on label maps: small, replayable, pure functions of a label map.

One module per concern, as Slicer's Segment Editor has one effect per tool:

* :mod:`.base` - the :class:`Edit` base class (``apply`` computes the array, calling the edit
  checks it against the grid and appends its record), :func:`healthy_anatomy`, :func:`composite`;
* :mod:`.geometry` - boxes, index <-> physical maps, RAS rotations, bounds against the grid;
* :mod:`.transforms` - :class:`Translate`, :class:`Rotate`, :class:`Scale`, :class:`Flip`;
* :mod:`.insert` - :class:`InsertTumour` (the source label map is passed in);
* :mod:`.parametric` - :class:`ParametricTumour` (a new tumour from a few numbers);
* :mod:`.random_edits` - :class:`RandomTumourEdit` (samples, then applies deterministic edits);
* :mod:`.records` - :func:`edit_from_record` and :func:`replay`.

Callers import from ``MedSynthLib.edits``.
"""

from .base import EDITS, MAX_OUTSIDE_FRACTION, Edit, composite, healthy_anatomy
from .geometry import euler_xyz_from_rotation, rotation_ras, tumour_centre
from .insert import InsertTumour
from .parametric import ParametricTumour
from .random_edits import RandomTumourEdit
from .records import edit_from_record, replay
from .transforms import Flip, Rotate, Scale, Translate, resample_tumour

__all__ = [
    "EDITS", "MAX_OUTSIDE_FRACTION", "Edit", "Translate", "Rotate", "Scale", "Flip", "InsertTumour",
    "ParametricTumour", "RandomTumourEdit", "healthy_anatomy", "composite", "resample_tumour",
    "tumour_centre", "edit_from_record", "replay", "rotation_ras", "euler_xyz_from_rotation",
]
