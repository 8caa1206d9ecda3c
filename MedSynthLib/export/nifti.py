"""BraTS-named NIfTI export of a synthetic case.

``<id>_t1, _t1ce, _t2, _flair`` (BraTS 2023: ``-t1n, -t1c, -t2w, -t2f``), the tumour labels
``<id>_seg`` in BraTS values (2021: 1 NCR, 2 ED, 4 ET; 2023: ET = 3) and the anatomy
``<id>_anatomy`` (1 CSF, 2 GM, 3 WM; 0 outside the brain and in the tumour; absent for a case of a
``medsynth generate`` dataset, which keeps no anatomy).  Every image
is written fresh from its voxels and grid, so no header text of an input travels along.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..schema.labels import MODALITIES, Label, schema_to_tumour
from .encoding import encode_intensities, patient_scan


#: File-name suffixes of the two BraTS namings; the tumour values follow the same
#: name in :data:`MedSynthLib.schema.labels.CONVENTIONS`.
NAMINGS: Mapping[str, Mapping[str, str]] = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg",
                  "anatomy": "_anatomy", "synthetic_mask": "_synthetic_mask"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg",
                  "anatomy": "-anatomy", "synthetic_mask": "-synthetic-mask"},
}


def anatomy_array(labels: np.ndarray) -> np.ndarray:
    """CSF 1, GM 2, WM 3; background and tumour 0."""
    return np.where(labels <= Label.WM, labels, 0).astype(np.uint8)


def write_nifti_case(case: Any, folder: Path, case_id: str, naming: str = "brats2021") -> list[str]:
    """Write the BraTS-named NIfTI files of one case into ``folder``; returns the file names."""
    from ..schema.volume_io import write_image

    suffixes = NAMINGS[naming]
    grid = case.grid
    names = []
    exact = patient_scan(case.provenance)  # the patient's values are never rounded
    for modality in MODALITIES:
        name = f"{case_id}{suffixes[modality]}.nii.gz"
        write_image(grid.image(encode_intensities(case.images[modality], exact).nifti), folder / name)
        names.append(name)
    name = f"{case_id}{suffixes['seg']}.nii.gz"
    write_image(grid.image(schema_to_tumour(case.labels.array, naming)), folder / name)
    names.append(name)
    if getattr(case, "anatomy", True):  # a generate case folder holds none: no file of zeros stands for it
        name = f"{case_id}{suffixes['anatomy']}.nii.gz"
        write_image(grid.image(anatomy_array(case.labels.array)), folder / name)
        names.append(name)
    if getattr(case, "synthetic_mask", None) is not None:  # a patient's scan: which voxels MedSynth re-rendered
        name = f"{case_id}{suffixes['synthetic_mask']}.nii.gz"
        write_image(grid.image(case.synthetic_mask.astype(np.uint8)), folder / name)
        names.append(name)
    return names
