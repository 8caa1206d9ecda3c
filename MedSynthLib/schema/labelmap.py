"""Reading and writing MedSynth label maps (NIfTI + provenance sidecar)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .grid import Grid, LabelMap
from .labels import SCHEMA_VERSION, LabelValueError, check_label_map
from .provenance import label_map_record, sidecar_path
from .volume_io import check_writable, read_image, write_image, write_json


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
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(sidecar, f"unreadable provenance sidecar ({exc})") from None
        if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise InputError(sidecar, f"label schema version {meta.get('schema_version')} is not "
                                      f"this MedSynth's schema version {SCHEMA_VERSION}")
        history = list(meta.get("history", []))
    return LabelMap(array, Grid.from_image(image), history)


def label_map_outputs(path: str | os.PathLike[str]) -> list[Path]:
    """The files :func:`write_label_map` creates."""
    return [Path(path), sidecar_path(path)]


def write_label_map(labelmap: LabelMap, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the label map (uint8 NIfTI) and its provenance sidecar, each atomically."""
    outputs = label_map_outputs(path)
    check_writable(outputs, overwrite)
    write_image(labelmap.image(), outputs[0], overwrite=overwrite)
    write_json(label_map_record(labelmap.history, labelmap.array), outputs[1], overwrite=overwrite)
    return outputs[0]
