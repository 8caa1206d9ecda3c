"""The healthy canvas: the ICBM152 2009a symmetric template shipped inside nilearn.

T1 and grey/white-matter probability maps come with the ``nilearn`` wheel, so
no download is needed.  The canvas is labelled by the same model as the real
cases (:class:`~MedSynthLib.cases.atlas_anatomy.AtlasPriorEM`, T1 only: the template's
own GM/WM maps are the priors, CSF = brain - GM - WM, no registration needed).

The template's brain mask leaves the basal cisterns and the deep fissures outside
the brain although the brain surrounds them (4.9 mL enclosed in 2D slices): they
would be black on every synthetic contrast.  They are filled into the mask and,
having no T1 there, take their class from the priors (CSF).
"""

from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk

from ..schema.grid import Grid, LabelMap
from ..schema.labels import SCHEMA_VERSION, Label

from .icbm152 import TEMPLATE_NAME, _load, enclosed_background  # noqa: F401  (re-exported)


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
