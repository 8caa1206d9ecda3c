"""The healthy canvas: the ICBM152 2009a symmetric template shipped inside nilearn.

T1 and grey/white-matter probability maps come with the ``nilearn`` wheel, so
no download is needed.  There is no CSF map: CSF is the brain mask minus GM
minus WM, and every brain voxel takes its most probable class.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..schema.grid import Grid, LabelMap
from ..schema.labels import SCHEMA_VERSION, Label
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
    return t1, gm, wm, mask


def template_t1() -> sitk.Image:
    """The ICBM152 2009a T1 template (197 x 233 x 189, 1 mm)."""
    return sitk.Image(_load()[0])


def template_label_map() -> LabelMap:
    """The 7-class label map of the healthy template (no tumour)."""
    t1, gm, wm, brain = _load()
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + Label.CSF).astype(np.uint8)
    labels[~brain] = Label.BACKGROUND
    record = {"name": "template_labels", "params": {"template": TEMPLATE_NAME}, "schema_version": SCHEMA_VERSION}
    return LabelMap(labels, Grid.from_image(t1), [record])
