"""The ICBM152 2009a symmetric template files shipped inside nilearn: T1, GM/WM priors, brain mask.

One loader for the healthy canvas (:mod:`.template`) and the tissue priors of the atlas
anatomy model (:mod:`.atlas_anatomy`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..schema.volume_io import read_image

TEMPLATE_NAME = "ICBM152-2009a-sym"
_FILES = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}


#: nilearn's whole-brain mask of this template: T1 above this fraction of its maximum.
BRAIN_THRESHOLD = 0.2


def _data_dir() -> Path:
    # Located without importing nilearn.datasets, which imports scikit-learn (several seconds
    # of start-up for every `medsynth labels`).
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nilearn is not installed: it ships the ICBM152 template MedSynth uses")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[sitk.Image, np.ndarray, np.ndarray, np.ndarray]:
    folder = _data_dir()
    t1 = read_image(folder / _FILES["t1"])
    # The probability maps are stored as 0-255.
    gm = sitk.GetArrayFromImage(read_image(folder / _FILES["gm"])).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(read_image(folder / _FILES["wm"])).astype(np.float32) / 255.0
    # The same mask as nilearn's load_mni152_brain_mask(resolution=1) (checked by a test).
    t1_array = sitk.GetArrayFromImage(t1).astype(np.float32)
    mask = t1_array / t1_array.max() > BRAIN_THRESHOLD
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(mask | (gm + wm > 0.5))
    mask |= enclosed_background(mask)
    return t1, gm, wm, mask


def enclosed_background(mask: np.ndarray) -> np.ndarray:
    """Background voxels enclosed by the mask in an axial, coronal or sagittal slice."""
    from scipy import ndimage

    enclosed = np.zeros_like(mask)
    for axis in range(3):
        filled = np.stack([ndimage.binary_fill_holes(plane) for plane in np.moveaxis(mask, axis, 0)])
        enclosed |= np.moveaxis(filled, 0, axis) & ~mask
    return enclosed
