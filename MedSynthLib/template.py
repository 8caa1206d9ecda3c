"""The healthy canvas: the ICBM152 2009a symmetric template shipped inside nilearn.

T1 and grey/white-matter probability maps come with the ``nilearn`` wheel, so
no download is needed.  The canvas is labelled by the same model as the real
cases (:class:`~MedSynthLib.atlas_anatomy.AtlasPriorEM`, T1 only: the template's
own GM/WM maps are the priors, CSF = brain - GM - WM, no registration needed).

The template's brain mask leaves the basal cisterns and the deep fissures outside
the brain although the brain surrounds them (4.9 mL enclosed in 2D slices): they
would be black on every synthetic contrast.  They are filled into the mask and,
having no T1 there, take their class from the priors (CSF).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .grid import Grid, LabelMap
from .io import read_image
from .labels import SCHEMA_VERSION, Label

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


def template_t1() -> sitk.Image:
    """The ICBM152 2009a T1 template (197 x 233 x 189, 1 mm)."""
    return sitk.Image(_load()[0])


@functools.lru_cache(maxsize=1)
def _template_labels() -> np.ndarray:
    from .atlas_anatomy import AtlasPriorEM

    labels = AtlasPriorEM().segment_template()
    labels[~_load()[3]] = Label.BACKGROUND
    labels.setflags(write=False)
    return labels


def template_label_map() -> LabelMap:
    """The 7-class label map of the healthy template (no tumour)."""
    from .atlas_anatomy import AtlasPriorEM

    t1 = _load()[0]
    record = {"name": "template_labels",
              "params": {"template": TEMPLATE_NAME, "anatomy_model": AtlasPriorEM().to_json()},
              "schema_version": SCHEMA_VERSION}
    return LabelMap(_template_labels().copy(), Grid.from_image(t1), [record])
