"""Reading and writing MedSynth label maps (NIfTI + provenance sidecar)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .grid import Grid, LabelMap
from .labels import SCHEMA_VERSION, LabelValueError, check_anatomy, check_label_map, check_whole_brain
from .outputs import commit_files, output_lock, staging_folder
from .provenance import PrivacyRecord, array_sha256, label_map_record, privacy_of, sidecar_path
from .volume_io import (IMAGE_SUFFIXES, check_writable, image_files, read_image, strip_image_suffix, write_image,
                        write_json)

LABEL_MAP_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".nhdr")  # one file each (+ .mhd's .zraw)


def read_label_map(path: str | os.PathLike[str], *, require_brain: bool = True) -> LabelMap:
    """Read a 7-class label map; its sidecar history (and measured privacy) is picked up when present.

    The image and its sidecar are read under the output's shared lock, so a concurrent
    write is seen whole or not at all, and the sidecar's ``labels_sha256`` must match the
    voxels (an image whose sidecar belongs to another map is refused).

    Raises:
        InputError: unreadable, not 3D, values outside 0-6, an empty brain, no white matter or less than a
            brain on a whole-head grid (not a MedSynth map: a tumour segmentation or mask), a sidecar
            written for another schema version, or a sidecar whose hash does not match.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    for attempt in range(3):  # a write that starts while reading shows as a hash mismatch: read again
        with output_lock(path, shared=True):
            image = read_image(path)
            meta = None
            has_sidecar = sidecar.exists()
            if has_sidecar:
                try:
                    meta = json.loads(sidecar.read_text())
                except (OSError, ValueError) as exc:
                    raise InputError(sidecar, f"unreadable provenance sidecar ({exc})") from None
        expected = meta.get("labels_sha256") if isinstance(meta, dict) else None
        if expected is None or expected == array_sha256(_schema_array(image)):
            break
    array = sitk.GetArrayFromImage(image)
    try:
        check_label_map(array)
    except LabelValueError as exc:
        raise InputError(path, str(exc)) from None
    array = array.astype(np.uint8)
    grid = Grid.from_image(image)
    if require_brain and not array.any():
        raise InputError(path, "empty brain: the label map has no brain voxels")
    if require_brain:
        try:
            _check_brain(array, grid)  # here, where a user's file is read: in-memory maps may hold any classes
        except LabelValueError as exc:
            raise InputError(path, str(exc)) from None
    history: list = []
    privacy = None
    if has_sidecar:
        if not isinstance(meta, dict):
            raise InputError(sidecar, "not a MedSynth label-map sidecar (a JSON object is expected)")
        if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise InputError(sidecar, f"label schema version {meta.get('schema_version')} is not "
                                      f"this MedSynth's schema version {SCHEMA_VERSION}")
        expected = meta.get("labels_sha256")
        if expected is not None and expected != array_sha256(array):
            raise InputError(sidecar, f"does not match {path.name} (labels_sha256 differs): the image or the "
                                      "sidecar was replaced by another run or by hand")
        history = meta.get("history", [])
        if not isinstance(history, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                    for e in history):
            raise InputError(sidecar, "provenance sidecar: 'history' must be a list of edit records "
                                      "(objects with a 'name')")
        history = list(history)
        privacy = PrivacyRecord.from_json(meta.get("privacy"))
    return LabelMap(array, grid, history, privacy=privacy)


def read_tumour_source(path: str | os.PathLike[str], label_convention: str | None = None) -> LabelMap:
    """The map an insert takes its tumour from: a MedSynth label map, or an expert tumour segmentation.

    A file with a provenance sidecar, or holding a whole brain's anatomy and a tumour, is a MedSynth label map
    (:func:`read_label_map`). Any other file, and every file when ``label_convention`` is given, is a tumour
    segmentation (a BraTS ``*_seg``, an MSD label map): its values are read by ``label_convention`` or by
    :func:`~MedSynthLib.schema.labels.detect_tumour_convention`, and the map holds its tumour alone (no brain:
    an insert needs a centre, or the same grid to keep the tumour's own place).

    Raises:
        InputError: a file that is neither, an ambiguous convention, or no tumour voxel.
    """
    from .labels import Label, detect_tumour_convention, tumour_to_schema

    path = Path(path)
    if label_convention is None and sidecar_path(path).exists():
        return read_label_map(path)
    image = read_image(path)
    array = sitk.GetArrayFromImage(image)
    grid = Grid.from_image(image)
    if label_convention is None:
        try:
            check_label_map(array)
            _check_brain(array, grid)
            is_brain = bool((array >= Label.NCR).any())  # values 0-3 alone: a BraTS 2023 / MSD map without its 4
        except LabelValueError:
            is_brain = False
        if is_brain:
            return read_label_map(path)
    try:
        tumour = tumour_to_schema(array, label_convention or detect_tumour_convention(array))
    except LabelValueError as exc:
        raise InputError(path, f"neither a MedSynth label map nor a tumour segmentation: {exc}") from None
    if not tumour.any():
        raise InputError(path, "tumour segmentation holds no tumour voxel")
    return LabelMap(tumour, grid, [])


def _check_brain(array: np.ndarray, grid: Grid) -> None:
    """A whole brain's anatomy (white matter, at least a brain's volume on a whole-head grid), not a tumour
    segmentation or mask: raises :class:`LabelValueError`."""
    check_anatomy(array)
    check_whole_brain(array, grid.voxel_volume_mm3 / 1000.0)


def _schema_array(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    return array.astype(np.uint8) if array.min() >= 0 and array.max() <= 255 else array


def label_map_outputs(path: str | os.PathLike[str]) -> list[Path]:
    """The files :func:`write_label_map` creates: the image, a ``.mhd``'s data file, the sidecar.

    Raises:
        InputError: the path's suffix is not a 3D image format (``x.png`` would be written as a 2D slice).
    """
    path = Path(path)
    if not path.name.lower().endswith(LABEL_MAP_SUFFIXES) or strip_image_suffix(path.name) == "":
        raise InputError(path, f"unsupported output suffix for a label map (use {', '.join(LABEL_MAP_SUFFIXES)})")
    return [*image_files(path), sidecar_path(path)]


def label_map_inputs(path: str | os.PathLike[str]) -> list[Path]:
    """The files a label map given as an input stands for: the image and its sidecar (the image alone for a
    suffix that cannot hold a label map, which its reader then refuses)."""
    try:
        return label_map_outputs(path)
    except InputError:
        return [Path(path)]


def write_label_map_files(labelmap: LabelMap, path: str | os.PathLike[str]) -> list[Path]:
    """Write image and sidecar without locking (into a folder this run owns, e.g. a staging folder)."""
    outputs = label_map_outputs(path)
    write_image(labelmap.image(), path)
    write_json(label_map_record(labelmap.history, labelmap.array, privacy_of(labelmap)), outputs[-1])
    return outputs


def write_label_map(labelmap: LabelMap, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the label map (uint8) and its provenance sidecar as one unit.

    Both are built in a staging folder beside the output and moved into place under the
    output's lock, after checking again that neither exists (unless ``overwrite``).
    """
    path = Path(path)
    outputs = label_map_outputs(path)
    check_writable(outputs, overwrite)
    with staging_folder(path) as stage:
        staged = write_label_map_files(labelmap, stage / path.name)
        moves = dict(zip(staged, outputs))
        order = [*staged[1:-1], staged[0], staged[-1]]  # a data file before its header, the sidecar last
        commit_files({s: moves[s] for s in order}, overwrite=overwrite, lock_target=path)  # readers lock the image
    return path
