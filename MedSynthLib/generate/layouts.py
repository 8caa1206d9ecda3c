"""Dataset layouts: nnU-Net v2 raw, Medical Segmentation Decathlon Task01, BraTS 2021 and 2023.

A case is first written into a staging folder that mirrors the output tree, then moved into
place (:func:`commit_staged`): a case folder of the BraTS layouts as one rename, the files of
the nnU-Net and MSD layouts (which share ``imagesTr``/``labelsTr``) one rename each.  The
case's provenance file, written last, is what marks it complete: a rerun redoes every case
without one.  ``dataset.json`` is written at the end from the completed cases on disk.

Tumour labels per layout (MedSynth NCR 4 / ED 5 / ET 6 mapped with
:func:`MedSynthLib.schema.labels.schema_to_tumour`):

* nnU-Net v2 and MSD: 1 oedema, 2 non-enhancing / necrotic core, 3 enhancing (the MSD Task01
  values, which nnU-Net's own BraTS conversion also uses); nnU-Net trains on the regions
  whole tumour [1, 2, 3], tumour core [2, 3] and enhancing tumour [3];
* BraTS 2021: 1 NCR, 2 ED, 4 ET; BraTS 2023: 1 NCR, 2 ED, 3 ET.

The nnU-Net and MSD ``dataset.json`` also carry ``label_values`` (:meth:`Layout.label_table`: which value is which
class, and its BraTS value), a key nnU-Net and MONAI ignore; the MSD task folder has an empty ``imagesTs``, as the
Decathlon's and as nnU-Net's MSD converter requires.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from ..schema.grid import Grid
from ..schema.labels import CONVENTIONS, LABEL_INFO, Label, schema_to_tumour
from ..schema.review import BRATS_SUFFIXES

LAYOUTS = ("nnunet", "msd", "brats2021", "brats2023")
#: nnU-Net channel order (as nnU-Net's BraTS 2021 conversion) and MSD Task01's modality order.
NNUNET_CHANNELS = ("t1", "t1ce", "t2", "flair")
NNUNET_CHANNEL_NAMES = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
#: nnU-Net's region-based BraTS targets over the MSD tumour labels (1 ED, 2 NCR, 3 ET), in its dataset.json terms.
NNUNET_REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
NNUNET_REGIONS_CLASS_ORDER = [1, 2, 3]
MSD_ORDER = ("flair", "t1", "t1ce", "t2")
MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")


@dataclass(frozen=True)
class Layout:
    """Where one layout puts a dataset's files.

    Attributes:
        kind: one of :data:`LAYOUTS`.
        dataset_id: nnU-Net dataset id / MSD task number.
        name: dataset name (letters and digits).
    """

    kind: str
    dataset_id: int = 501
    name: str = "BrainTumourSynth"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.kind!r}")
        if not 1 <= int(self.dataset_id) <= 999:
            raise ValueError(f"--dataset-id must lie in 1..999, got {self.dataset_id}")
        if not _NAME.match(self.name):
            raise ValueError(f"--name must be letters and digits starting with a letter, got {self.name!r}")

    @property
    def dataset_dir(self) -> str:
        """The dataset folder inside the output (empty for the BraTS layouts: one folder per case)."""
        if self.kind == "nnunet":
            return f"Dataset{int(self.dataset_id):03d}_{self.name}"
        if self.kind == "msd":
            return f"Task{int(self.dataset_id):02d}_{self.name}"
        return ""

    def case_id(self, index: int) -> str:
        if self.kind == "brats2023":
            return f"{self.name}-{index:05d}-000"
        return f"{self.name}_{index:05d}"

    def files(self, case_id: str) -> dict[str, str]:
        """Relative output path of every file of a case, keyed by what it holds."""
        root = self.dataset_dir
        if self.kind == "nnunet":
            out = {m: f"{root}/imagesTr/{case_id}_{c:04d}.nii.gz" for c, m in enumerate(NNUNET_CHANNELS)}
            out["seg"] = f"{root}/labelsTr/{case_id}.nii.gz"
            return out
        if self.kind == "msd":
            return {"image4d": f"{root}/imagesTr/{case_id}.nii.gz", "seg": f"{root}/labelsTr/{case_id}.nii.gz"}
        suffixes = BRATS_SUFFIXES[self.kind]
        return {key: f"{case_id}/{case_id}{suffix}.nii.gz" for key, suffix in suffixes.items()}

    @property
    def label_convention(self) -> str:
        return {"nnunet": "msd", "msd": "msd"}.get(self.kind, self.kind)

    @property
    def case_folders(self) -> str | None:
        """The BraTS layouts' case folder pattern (``None`` for the layouts with one dataset folder)."""
        return None if self.dataset_dir else f"{self.case_id(0).replace('00000', 'NNNNN')}/"

    def label_table(self) -> dict[str, Any]:
        """Which value of this layout's segmentations is which tumour class, and each value's BraTS 2021 / 2023
        value: nnU-Net's and MSD's ``labels`` name regions or classes without saying which class a prediction's
        1, 2, 3 is, and a user mapping predictions back to BraTS needs it."""
        convention = CONVENTIONS[self.label_convention]
        by_value = sorted((value, label) for label, value in convention.from_schema.items())
        table: dict[str, Any] = {"convention": convention.description,
                                 "values": {"0": "background",
                                            **{str(v): LABEL_INFO[label].short_name for v, label in by_value}},
                                 "classes": {LABEL_INFO[label].short_name: LABEL_INFO[label].name
                                             for label in (Label.NCR, Label.ED, Label.ET)}}
        for brats in ("brats2021", "brats2023"):
            target = CONVENTIONS[brats].from_schema
            table[f"to_{brats}"] = {"0": 0, **{str(v): target[label] for v, label in by_value}}
        return table


def _write(image: sitk.Image, path: Path) -> None:
    # gzip at the NIfTI writer's own level: SimpleITK 2.5.7 wrote identical bytes for levels 0-9 here,
    # and a BraTS volume takes about 0.06 s of CPU to compress, so no level option is offered.
    sitk.WriteImage(image, str(path), useCompression=True)


def encode_images(images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """int16 (rounded) when every modality fits without loss that matters, else float32 for all."""
    from ..schema.volume_io import compact_intensities

    compact = {m: compact_intensities(a) for m, a in images.items()}
    if all(a.dtype == np.int16 for a in compact.values()):
        return compact
    return {m: np.asarray(a, np.float32) for m, a in images.items()}


def write_case_files(layout: Layout, staging: Path, case_id: str, images: Mapping[str, np.ndarray],
                     labels: np.ndarray, grid: Grid) -> dict[str, str]:
    """Write one case's files under ``staging`` (mirroring the output tree); returns them."""
    files = layout.files(case_id)
    for rel in files.values():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
    if layout.kind == "msd":
        # The Decathlon format has an imagesTs folder, empty here: nnU-Net's MSD converter refuses a task without one.
        (staging / layout.dataset_dir / "imagesTs").mkdir(exist_ok=True)
    seg = schema_to_tumour(labels, layout.label_convention)
    jobs: list[tuple[sitk.Image, Path]] = [(grid.image(seg), staging / files["seg"])]
    if layout.kind == "msd":
        volumes = [grid.image(np.ascontiguousarray(images[m])) for m in MSD_ORDER]
        jobs.append((sitk.JoinSeries(volumes), staging / files["image4d"]))
    else:
        jobs += [(grid.image(np.ascontiguousarray(images[m])), staging / files[m]) for m in NNUNET_CHANNELS]
    # gzip dominates writing and SimpleITK releases the GIL while it runs: one thread per file.
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda job: _write(job[0], job[1]), jobs))
    return files


def commit_staged(staging: Path, out: Path) -> None:
    """Move everything under ``staging`` to the same place under ``out``.

    A folder absent from ``out`` moves as one rename; an existing folder (``imagesTr``) is
    entered and its files replaced one rename each.
    """
    for child in sorted(staging.iterdir()):
        dest = out / child.name
        if child.is_dir() and dest.is_dir():
            commit_staged(child, dest)
        else:
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(child, dest)
    shutil.rmtree(staging, ignore_errors=True)


def dataset_json(layout: Layout, case_ids: list[str], description: str) -> dict[str, Any] | None:
    """The layout's ``dataset.json`` for the given complete cases (``None`` for the BraTS layouts)."""
    if layout.kind == "nnunet":
        return {
            "name": layout.name,
            "description": description,
            "channel_names": NNUNET_CHANNEL_NAMES,
            "labels": NNUNET_REGION_LABELS,
            "regions_class_order": NNUNET_REGIONS_CLASS_ORDER,
            "numTraining": len(case_ids),
            "file_ending": ".nii.gz",
            "synthetic": True,
            # nnU-Net reads only its own keys: this one says which class each label value is.
            "label_values": layout.label_table(),
        }
    if layout.kind == "msd":
        return {
            "name": layout.name,
            "description": description,
            "reference": "synthetic (MedSynth)",
            "licence": "see README.md",
            "release": "1.0",
            "tensorImageSize": "4D",
            "modality": MSD_MODALITY,
            "labels": MSD_LABELS,
            "label_values": layout.label_table(),
            "numTraining": len(case_ids),
            "numTest": 0,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids],
            "test": [],
        }
    return None
