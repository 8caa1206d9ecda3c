"""The synthetic-case folder: the one module that writes and reads it.

A folder written by ``medsynth synthesize`` (or ``demo``, or the Slicer module's
workers) holds::

    t1.nii.gz t1ce.nii.gz t2.nii.gz flair.nii.gz   scanner units, 0 outside the brain
    labels.nii.gz labels.json                      the label map and its sidecar
    provenance.json                                typed SynthesisRecord, with the sha256 of every file above
    synthetic_mask.nii.gz                          inpainting into a real case only: 1 = synthetic voxel
    montage.png                                    optional preview

Intensities are converted once, float32 -> int16 where that loses nothing that matters
(:func:`~MedSynthLib.schema.volume_io.compact_intensities`), and read back in the stored
type, so an export stores exactly what was written (no int16 -> float -> int16 trip).
:func:`read_case_folder` refuses a folder whose files do not match the recorded hashes:
a real scan copied or linked over a synthetic image is never read as synthetic.

It also reads a case folder of a ``medsynth generate`` dataset in a BraTS layout: the four images and the
tumour labels in BraTS naming, its provenance the dataset's ``provenance/<case id>.json`` (with the sha256 of
each file, ``files_sha256``).  Such a folder holds no anatomy: its label map is the tumour alone
(:attr:`CaseFolder.anatomy` False).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..schema.errors import InputError
from ..schema.grid import Grid, LabelMap
from ..schema.labels import SCHEMA_VERSION
from ..schema.provenance import (OUTPUT_FILES, SYNTHETIC_CASE_KIND, SYNTHETIC_MASK_FILE, Redactions, SynthesisRecord,
                                 array_sha256, file_sha256)

MODALITIES = ("t1", "t1ce", "t2", "flair")
LABELS_FILE = "labels.nii.gz"
PROVENANCE_FILE = "provenance.json"
MONTAGE_FILE = "montage.png"
#: Every file MedSynth writes into a case folder; ``--overwrite`` replaces these and nothing else.
OWNED_FILES = (*OUTPUT_FILES, SYNTHETIC_MASK_FILE, MONTAGE_FILE, PROVENANCE_FILE)


def case_provenance(model: Any, labelmap: LabelMap, privacy: Any, *, seed: int, device: str,
                    precision: str) -> dict[str, Any]:
    """The provenance every synthetic case folder records; the caller adds its own fields (timings, ...).

    Args:
        model: the :class:`~MedSynthLib.synthesis.models.ModelCard` that painted the images: recorded by name, its
            weights' sha256 and its config's (the intensity statistics and appearance prior shape the images too).
        labelmap: the label map the images were made from.
        privacy: its :class:`~MedSynthLib.schema.provenance.PrivacyRecord` (inpainting marks the patient's images).
        seed, device, precision: how the network ran.
    """
    from ..schema.provenance import software_versions
    from .models import config_sha256

    model_record = {"name": model.name, "sha256": model.sha256}
    config = getattr(model, "config", None)
    if isinstance(config, dict):  # a card's config always; a caller's stand-in without one records no checksum
        model_record["config_sha256"] = config_sha256(config)
    return {
        "kind": SYNTHETIC_CASE_KIND,
        "synthetic": True,
        "label_schema_version": SCHEMA_VERSION,
        "model": model_record,
        "labels_sha256": array_sha256(labelmap.array),
        "edits": labelmap.history,
        "privacy": privacy.to_json(),
        "seed": seed,
        "device": device,
        "precision": precision,
        "grid": labelmap.grid.to_json(),
        "software": software_versions(),
    }


def write_case_folder(labelmap: LabelMap, images: Mapping[str, np.ndarray], provenance: Mapping[str, Any],
                      out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                      extra: Callable[[Path], None] | None = None, synthetic_mask: np.ndarray | None = None,
                      keep_types: bool = False, like: Mapping[str, Path] | None = None) -> Path:
    """Write a synthetic case: build it in a staging folder, hash every file, commit under the lock.

    Args:
        labelmap: the label map the images were synthesised from.
        images: modality -> (k, j, i) float scanner units.
        provenance: the synthesis record (``files`` is filled in here).
        out_dir: the case folder; with ``overwrite`` an existing one keeps files MedSynth does not own.
        extra: writes further files (a montage) into the staging folder.
        synthetic_mask: which voxels are synthetic (inpainting into a real case), written as
            ``synthetic_mask.nii.gz`` (uint8) and hashed with the other files.
        keep_types: store each image in its own type (a real scan's voxels as they were stored) instead of
            converting float32 to int16 where that loses nothing that matters.
        like: modality -> the real scan's NIfTI file the image was made from (with ``synthetic_mask``): the
            image is written as a copy of that file, its header and its stored voxels outside the mask unchanged.
    """
    from ..schema.labelmap import write_label_map_files
    from ..schema.outputs import commit_folder, staging_folder
    from ..schema.volume_io import check_writable, compact_intensities, write_image, write_json, write_nifti_like

    out_dir = Path(out_dir)
    check_writable([out_dir], overwrite)
    grid = labelmap.grid
    with staging_folder(out_dir) as stage:

        def write_modality(modality: str) -> None:
            target = stage / f"{modality}.nii.gz"
            if like is not None and synthetic_mask is not None and modality in like and \
                    write_nifti_like(images[modality], synthetic_mask, like[modality], target):
                return
            array = images[modality] if keep_types else compact_intensities(images[modality])
            write_image(grid.image(array), target)

        # gzip dominates writing and SimpleITK releases the GIL while it runs: one thread per volume.
        with ThreadPoolExecutor(len(MODALITIES) + 1) as pool:
            labels = pool.submit(write_label_map_files, labelmap, stage / LABELS_FILE)
            list(pool.map(write_modality, MODALITIES))
            labels.result()
        if synthetic_mask is not None:
            write_image(grid.image(synthetic_mask.astype(np.uint8)), stage / SYNTHETIC_MASK_FILE)
        if extra is not None:
            extra(stage)
        record = dict(provenance)
        names = OUTPUT_FILES + ((SYNTHETIC_MASK_FILE,) if synthetic_mask is not None else ())
        record["files"] = {name: file_sha256(stage / name) for name in names}
        write_json(record, stage / PROVENANCE_FILE)
        commit_folder(stage, out_dir, OWNED_FILES, overwrite=overwrite)
    return out_dir


@dataclass
class CaseFolder:
    """A synthetic case folder, read and verified."""

    folder: Path
    images: dict[str, np.ndarray]  # modality -> (k, j, i), the stored type (int16 or float32)
    labels: LabelMap
    raw_provenance: dict[str, Any]
    record: SynthesisRecord
    redactions: int
    synthetic_mask: np.ndarray | None = None  # (k, j, i) bool: the re-rendered voxels of a real scan (inpainting)
    #: modality (and ``labels``) -> its file; empty: the synthesize names (``t1.nii.gz`` ... ``labels.nii.gz``).
    files: dict[str, Path] = field(default_factory=dict)
    #: Whether :attr:`labels` holds the healthy anatomy; False for a generate case, whose folder keeps the tumour only.
    anatomy: bool = True
    #: The provenance's file (the folder's own ``provenance.json``, or the generate dataset's record of the case).
    provenance_file: Path | None = None

    @property
    def grid(self) -> Grid:
        return self.labels.grid

    @property
    def generated(self) -> bool:
        """A case folder of a ``medsynth generate`` dataset (its provenance kept by the dataset)."""
        return not self.anatomy

    def file(self, name: str) -> Path:
        """The file of a modality or of the label map (``labels``)."""
        default = LABELS_FILE if name == "labels" else f"{name}.nii.gz"
        return self.files.get(name, self.folder / default)

    def brain_mask(self) -> np.ndarray:
        """The brain: the label map's where it holds the anatomy, else the images' (:func:`brain_mask_of`)."""
        if self.anatomy:
            return self.labels.array > 0
        from ..cases.readers import brain_mask_of

        return brain_mask_of(self.images.values(), self.labels.array)


def is_medsynth_output(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a case folder MedSynth wrote (its provenance says so), not a patient's scans: a
    ``synthesize`` folder (its own ``provenance.json``) or a case folder of a ``generate`` dataset in a BraTS layout
    (the dataset's ``provenance/<case id>.json``, :func:`~MedSynthLib.schema.review.provenance_path`)."""
    from ..schema.review import provenance_path

    try:
        record = json.loads(provenance_path(folder).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("kind") == SYNTHETIC_CASE_KIND


def read_provenance(folder: Path, path: Path | None = None) -> dict[str, Any]:
    """The checked provenance of a synthetic case (``path``: where it is, by default the folder's own)."""
    path = folder / PROVENANCE_FILE if path is None else path
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable provenance ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("kind") != SYNTHETIC_CASE_KIND or raw.get("synthetic") is not True:
        raise InputError(path, "not the provenance of a MedSynth synthetic case; only synthetic cases can be exported")
    if raw.get("label_schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise InputError(path, f"label schema version {raw.get('label_schema_version')!r} "
                               f"is not this MedSynth's schema version {SCHEMA_VERSION}")
    return raw


def verify_files(folder: Path, raw: Mapping[str, Any]) -> None:
    """Every image must be a regular file (no link) whose sha256 is the one recorded at synthesis."""
    recorded = raw.get("files")
    if not isinstance(recorded, dict):
        raise InputError(folder / PROVENANCE_FILE,
                         "records no file checksums (written by an older MedSynth); synthesise the case again "
                         "so its images can be verified as synthetic")
    names = OUTPUT_FILES + ((SYNTHETIC_MASK_FILE,) if SYNTHETIC_MASK_FILE in recorded else ())
    _verify_checksums({name: folder / name for name in names}, recorded, folder / PROVENANCE_FILE)


def _verify_checksums(files: Mapping[str, Path], recorded: Mapping[str, Any], record: Path) -> None:
    """Each file (key -> path) a regular file whose sha256 is ``recorded[key]``, as ``record`` holds them."""
    for key, path in files.items():
        if path.is_symlink():
            raise InputError(path, "is a link, not the file MedSynth wrote; refusing to treat it as synthetic")
        if not path.is_file():
            raise InputError(path, f"missing: {record.name} records it, so this is not the complete case MedSynth "
                                   "wrote")
        expected = recorded.get(key)
        if not isinstance(expected, str):
            raise InputError(record, f"records no checksum for {path.name}")
        if file_sha256(path) != expected:
            raise InputError(path, f"does not match the sha256 recorded in {record.name}: the file was replaced "
                                   "after synthesis (not the synthetic image MedSynth wrote)")


def generated_record(folder: str | os.PathLike[str]) -> Path | None:
    """The ``medsynth generate`` dataset's record of this case folder, or None (a folder with its own
    provenance.json, or none at all)."""
    from ..schema.review import provenance_path

    path = provenance_path(folder)
    return None if path == Path(folder) / PROVENANCE_FILE else path


def generated_case_files(folder: Path, raw: Mapping[str, Any], record: Path) -> dict[str, Path]:
    """Modality (and ``labels``, the tumour segmentation) -> file of a generate case folder, by the naming of the
    layout its record names; refused when the record is not that of a BraTS-layout case of this folder."""
    from ..schema.review import BRATS_SUFFIXES

    layout = raw.get("layout")
    if layout not in BRATS_SUFFIXES:
        raise InputError(record, f"records layout {layout!r}: not a case folder of a BraTS-layout dataset")
    case_id = folder.resolve().name
    if raw.get("case_id") != case_id:
        raise InputError(record, f"is the record of case {raw.get('case_id')!r}, not of the folder {case_id}")
    suffixes = BRATS_SUFFIXES[layout]
    files = {m: folder / f"{case_id}{suffixes[m]}.nii.gz" for m in MODALITIES}
    files["labels"] = folder / f"{case_id}{suffixes['seg']}.nii.gz"
    return files


def labels_phrase(folder: str | os.PathLike[str]) -> str:
    """Where a MedSynth output keeps its labels, for a message: ``its label map is labels.nii.gz in it``, or for
    a generate case folder its tumour segmentation and the dataset's record."""
    record = generated_record(folder)
    if record is None:
        return f"its label map is {LABELS_FILE} in it"
    try:
        raw = json.loads(record.read_text())
        seg = generated_case_files(Path(folder), raw, record)["labels"].name
    except (OSError, ValueError, InputError):
        return f"a case of a medsynth generate dataset, recorded in {record}"
    return f"a case of a medsynth generate dataset: its tumour labels are {seg}, its record {record}"


def read_case_folder(folder: str | os.PathLike[str], *, verify: bool = True) -> CaseFolder:
    """Read and check a synthetic case folder.

    Raises:
        InputError: not a folder, a missing file, an unreadable or non-MedSynth provenance,
            files that do not match their recorded sha256 (``verify``), volumes on
            different grids, or labels that do not match the provenance.
    """
    import SimpleITK as sitk

    from ..schema.labelmap import read_label_map
    from ..schema.volume_io import read_image

    folder = Path(folder)
    if not folder.exists():
        raise InputError(folder, "synthetic case folder not found")
    if not folder.is_dir():
        raise InputError(folder, "not a folder (give a `medsynth synthesize` output folder)")
    record = generated_record(folder)
    if record is not None:
        return _read_generated_case(folder, record, verify)
    for name in MODALITIES:
        if not (folder / f"{name}.nii.gz").is_file():
            raise InputError(folder, f"missing modality {name} ({name}.nii.gz) - not a complete synthetic case")
    for name in (LABELS_FILE, PROVENANCE_FILE):
        if not (folder / name).is_file():
            raise InputError(folder, f"missing {name} - not a complete synthetic case")
    raw = read_provenance(folder)
    if verify:
        verify_files(folder, raw)
    labels = read_label_map(folder / LABELS_FILE)
    if raw.get("labels_sha256") != array_sha256(labels.array):
        raise InputError(folder / LABELS_FILE,
                         "does not match provenance.json (labels_sha256 differs): the case was changed after synthesis")
    images = {}
    for name in MODALITIES:
        path = folder / f"{name}.nii.gz"
        image = read_image(path)
        difference = labels.grid.difference(Grid.from_image(image))
        if difference is not None:
            raise InputError(path, f"not on the grid of labels.nii.gz: {difference}")
        array = sitk.GetArrayFromImage(image)
        images[name] = array if array.dtype in (np.int16, np.float32) else array.astype(np.float32)
    synthetic_mask = None
    if (folder / SYNTHETIC_MASK_FILE).is_file():
        image = read_image(folder / SYNTHETIC_MASK_FILE)
        difference = labels.grid.difference(Grid.from_image(image))
        if difference is not None:
            raise InputError(folder / SYNTHETIC_MASK_FILE, f"not on the grid of labels.nii.gz: {difference}")
        synthetic_mask = sitk.GetArrayFromImage(image) > 0
    redactions = Redactions()
    record = SynthesisRecord.from_json(raw, redactions)
    return CaseFolder(folder, images, labels, raw, record, redactions.count, synthetic_mask,
                      provenance_file=folder / PROVENANCE_FILE)


def _read_generated_case(folder: Path, record_file: Path, verify: bool) -> CaseFolder:
    """A case folder of a ``medsynth generate`` dataset: images and tumour labels verified against the sha256 its
    record keeps (``files_sha256``); the label map is the tumour alone, on the segmentation's grid."""
    import SimpleITK as sitk

    from ..schema.labels import LabelValueError, tumour_to_schema
    from ..schema.volume_io import read_image

    raw = read_provenance(folder, record_file)
    files = generated_case_files(folder, raw, record_file)
    if verify:
        recorded = raw.get("files_sha256")
        if not isinstance(recorded, dict):
            raise InputError(record_file, "records no file checksums (written by an older MedSynth); generate the "
                                          "dataset again so its images can be verified as synthetic")
        keys = {"labels": "seg"}  # the record names the segmentation as the layout does
        _verify_checksums(files, {name: recorded.get(keys.get(name, name)) for name in files}, record_file)
    seg_image = read_image(files["labels"])
    grid = Grid.from_image(seg_image)
    try:
        tumour = tumour_to_schema(sitk.GetArrayFromImage(seg_image), raw["layout"])
    except LabelValueError as exc:
        raise InputError(files["labels"], str(exc)) from None
    edits = raw.get("edits")
    labels = LabelMap(tumour, grid, [dict(e) for e in edits if isinstance(e, dict)] if isinstance(edits, list) else [])
    images = {}
    for name in MODALITIES:
        image = read_image(files[name])
        difference = grid.difference(Grid.from_image(image))
        if difference is not None:
            raise InputError(files[name], f"not on the grid of {files['labels'].name}: {difference}")
        array = sitk.GetArrayFromImage(image)
        images[name] = array if array.dtype in (np.int16, np.float32) else array.astype(np.float32)
    redactions = Redactions()
    record = SynthesisRecord.from_json(raw, redactions)
    return CaseFolder(folder, images, labels, raw, record, redactions.count, None, files, anatomy=False,
                      provenance_file=record_file)


__all__ = ["MODALITIES", "OWNED_FILES", "CaseFolder", "write_case_folder", "read_case_folder", "verify_files",
           "generated_record", "labels_phrase"]
