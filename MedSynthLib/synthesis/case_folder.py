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
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
        model: the :class:`~MedSynthLib.synthesis.models.ModelCard` that painted the images.
        labelmap: the label map the images were made from.
        privacy: its :class:`~MedSynthLib.schema.provenance.PrivacyRecord` (inpainting marks the patient's images).
        seed, device, precision: how the network ran.
    """
    from ..schema.provenance import software_versions

    return {
        "kind": SYNTHETIC_CASE_KIND,
        "synthetic": True,
        "label_schema_version": SCHEMA_VERSION,
        "model": {"name": model.name, "sha256": model.sha256},
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

    @property
    def grid(self) -> Grid:
        return self.labels.grid


def is_medsynth_output(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a case folder MedSynth wrote (its provenance says so), not a patient's scans."""
    try:
        record = json.loads((Path(folder) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("kind") == SYNTHETIC_CASE_KIND


def read_provenance(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE_FILE
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
    for name in names:
        path = folder / name
        if path.is_symlink():
            raise InputError(path, "is a link, not the file MedSynth wrote; refusing to treat it as synthetic")
        if not path.is_file():
            raise InputError(path, "missing: provenance.json records it, so this is not the complete case MedSynth "
                                   "wrote")
        expected = recorded.get(name)
        if not isinstance(expected, str):
            raise InputError(folder / PROVENANCE_FILE, f"records no checksum for {name}")
        if file_sha256(path) != expected:
            raise InputError(path, "does not match the sha256 recorded in provenance.json: the file was replaced "
                                   "after synthesis (not the synthetic image MedSynth wrote)")


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
    return CaseFolder(folder, images, labels, raw, record, redactions.count, synthetic_mask)


__all__ = ["MODALITIES", "OWNED_FILES", "CaseFolder", "write_case_folder", "read_case_folder", "verify_files"]
