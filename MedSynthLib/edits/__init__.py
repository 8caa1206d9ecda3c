"""Tumour edits on label maps (implemented in :mod:`MedSynthLib.edits.transforms`).

The package exports the public edit API, so callers import from ``MedSynthLib.edits``.
"""

from .transforms import (
    EDITS,
    MAX_OUTSIDE_FRACTION,
    Edit,
    Flip,
    InsertTumour,
    ParametricTumour,
    RandomTumourEdit,
    Rotate,
    Scale,
    Translate,
    composite,
    edit_from_record,
    euler_xyz_from_rotation,
    healthy_anatomy,
    load_label_map,
    replay,
    resample_tumour,
    rotation_ras,
    tumour_centre,
)

__all__ = [
    "EDITS", "MAX_OUTSIDE_FRACTION", "Edit", "Translate", "Rotate", "Scale", "Flip", "InsertTumour",
    "ParametricTumour", "RandomTumourEdit", "healthy_anatomy", "composite", "resample_tumour",
    "tumour_centre", "load_label_map", "edit_from_record", "replay", "rotation_ras", "euler_xyz_from_rotation",
]
