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


def _data_dir() -> Path:
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[sitk.Image, np.ndarray, np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_brain_mask

    folder = _data_dir()
    t1 = read_image(folder / _FILES["t1"])
    # The probability maps are stored as 0-255.
    gm = sitk.GetArrayFromImage(read_image(folder / _FILES["gm"])).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(read_image(folder / _FILES["wm"])).astype(np.float32) / 255.0
    # nilearn's mask is on the same 1 mm grid; nibabel's (x, y, z) is SimpleITK's (k, j, i) reversed.
    mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj).transpose(2, 1, 0) > 0
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
