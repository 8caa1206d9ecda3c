"""Reading and writing MedSynth label maps (NIfTI + provenance sidecar)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .grid import Grid, LabelMap
from .labels import SCHEMA_VERSION, LabelValueError, check_label_map
from .provenance import label_map_record, sidecar_path
from .jsonshape import read_json
from .volume_io import IMAGE_SUFFIXES, check_writable, read_image, strip_image_suffix, write_image, write_json

LABEL_MAP_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".nhdr")  # one file each (+ .mhd's .raw)


def read_label_map(path: str | os.PathLike[str], *, require_brain: bool = True) -> LabelMap:
    """Read a 7-class label map; its sidecar history is picked up when present.

    Raises:
        InputError: unreadable, not 3D, values outside 0-6, an empty brain, or a sidecar
            written for another schema version.
    """
    path = Path(path)
    image = read_image(path)
    array = sitk.GetArrayFromImage(image)
    try:
        check_label_map(array)
    except LabelValueError as exc:
        raise InputError(path, str(exc)) from None
    array = array.astype(np.uint8)
    if require_brain and not array.any():
        raise InputError(path, "empty brain: the label map has no brain voxels")
    history: list = []
    sidecar = sidecar_path(path)
    if sidecar.exists():
        meta = read_json(sidecar, "provenance sidecar")
        if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise InputError(sidecar, f"label schema version {meta.get('schema_version')} is not "
                                      f"this MedSynth's schema version {SCHEMA_VERSION}")
        history = meta.get("history", [])
        if not isinstance(history, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                    for e in history):
            raise InputError(sidecar, "provenance sidecar: 'history' must be a list of edit records "
                                      "(objects with a 'name')")
    return LabelMap(array, Grid.from_image(image), history)


def label_map_outputs(path: str | os.PathLike[str]) -> list[Path]:
    """The files :func:`write_label_map` creates.

    Raises:
        InputError: the path's suffix is not a 3D image format (``x.png`` would be written as a 2D slice).
    """
    path = Path(path)
    if not path.name.lower().endswith(LABEL_MAP_SUFFIXES) or strip_image_suffix(path.name) == "":
        raise InputError(path, f"unsupported output suffix for a label map (use {', '.join(LABEL_MAP_SUFFIXES)})")
    return [path, sidecar_path(path)]


def write_label_map(labelmap: LabelMap, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the label map (uint8 NIfTI) and its provenance sidecar, each atomically."""
    outputs = label_map_outputs(path)
    check_writable(outputs, overwrite)
    write_image(labelmap.image(), outputs[0], overwrite=overwrite)
    write_json(label_map_record(labelmap.history, labelmap.array), outputs[1], overwrite=overwrite)
    return outputs[0]
