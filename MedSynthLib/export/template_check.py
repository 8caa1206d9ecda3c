"""Whether a case that says it was drawn in the healthy template is: its voxels against the shipped template.

Everything a case folder says of itself (its privacy record, its label map's history, the sha256 of its files) is
written by whoever wrote the folder: a patient's case with its history edited to begin at the template passed as
anonymous.  What the template alone gives, and every anonymous case keeps:

* its grid: the ICBM152 template's (MedSynth draws on it and writes the case on it, ``generate`` too);
* its labels: a tumour edit changes only the voxels of the tumour it draws or moves and of the tumour it replaces
  (refilled with the nearest anatomy, :func:`~MedSynthLib.edits.base.healthy_anatomy`); none deforms the brain
  around a tumour (no mass effect).  So the history, replayed on the template, changes a band of voxels, and
  outside it every label of the case is the template's: tumour voxels included, so a real tumour put where the
  history draws none is found too;
* its brain: the images are zero outside the brain, so their brain is the template's.  ``generate`` keeps the
  tumour labels only; its images' brain and tumour are checked.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..schema.grid import LabelMap

#: Least Dice of a case's images' brain (any image non-zero, holes filled) with the template's brain.  MedSynth's
#: anonymous cases measure 1.000 (demo, ``tumour new`` on it, ``generate --anonymous``); the brains of 11 BraTS
#: patients registered to the template (affine, brain mask to brain mask) 0.935 to 0.962.
MIN_TEMPLATE_BRAIN_DICE = 0.99
#: The band of the replayed edits grown by this many voxels: a case made by another MedSynth version may draw a
#: tumour's edge a voxel otherwise (ties of the nearest-anatomy refill, float rounding of the noise field).
BAND_MARGIN_VOXELS = 2
#: History steps that carry no replayable edit.  An anonymous history holds them only where they change nothing
#: outside a tumour an earlier step drew (strokes that erase tumour, refilled), which the band already covers.
_NOT_REPLAYED = ("template_labels", "manual_segment_edit", "tumour_from_segmentation", "insert_tumour")


@functools.lru_cache(maxsize=1)
def _template() -> LabelMap:
    from ..cases.template import template_label_map

    return template_label_map()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def replayed_band(start: LabelMap, history: Sequence[Any]) -> np.ndarray:
    """The voxels the history's edits change when replayed on ``start``, grown by :data:`BAND_MARGIN_VOXELS`.

    A step that cannot be replayed (not an edit, or an edit refused on this map) is skipped: what it changed then
    lies outside the band, and the comparison says so."""
    from scipy import ndimage

    from ..edits.base import FULL_3X3
    from ..edits.records import edit_from_record
    from ..schema.errors import EditError

    band = np.zeros(start.array.shape, bool)
    labelmap = LabelMap(start.array, start.grid, [])
    for record in history:
        if not isinstance(record, dict) or record.get("name") in _NOT_REPLAYED:
            continue
        try:
            after = edit_from_record(record)(labelmap)
        except (EditError, TypeError, ValueError):
            continue
        band |= after.array != labelmap.array
        labelmap = after
    if not band.any():
        return band
    return ndimage.binary_dilation(band, FULL_3X3, iterations=BAND_MARGIN_VOXELS)


def _grid_problem(case: Any, path: Path) -> tuple[Path, str] | None:
    difference = _template().grid.difference(case.grid)
    if difference is None:
        return None
    return path, f"it is not on the template's grid ({difference})"


def _images_brain_problem(case: Any) -> tuple[Path, str] | None:
    from ..cases.readers import brain_mask_of

    dice = _dice(brain_mask_of(case.images.values(), None), _template().array > 0)
    if dice >= MIN_TEMPLATE_BRAIN_DICE:
        return None
    return case.file("t1"), (f"its images' brain (their non-zero voxels) is not the template's brain (Dice {dice:.3f} "
                             f"< {MIN_TEMPLATE_BRAIN_DICE})")


def template_anatomy_problem(case: Any) -> tuple[Path, str] | None:
    """Why a case folder (:class:`~MedSynthLib.synthesis.case_folder.CaseFolder`) whose record says template anatomy
    is not the template's: ``(the file, a phrase)``, or None when its voxels bear the record out."""
    labels_file = case.file("labels")
    problem = _grid_problem(case, labels_file)
    if problem is not None:
        return problem
    template = _template()
    if case.anatomy:
        history = case.labels.history
        band = replayed_band(template, history)
        differ = (case.labels.array != template.array) & ~band
        count = int(np.count_nonzero(differ))
        if count:
            return labels_file, (f"{count} voxels of its label map differ from the template's outside the tumours its "
                                 "history draws")
    else:
        problem = _generated_tumour_problem(case)
        if problem is not None:
            return problem
    return _images_brain_problem(case)


def _generated_tumour_problem(case: Any) -> tuple[Path, str] | None:
    """A ``generate`` case keeps the tumour alone: it must lie where its edits, replayed on the template as
    ``generate`` draws (cropped to the brain), put one."""
    from ..schema.grid import crop_to_brain

    template = _template()
    cropped, crop_grid, offset = crop_to_brain(template.array, template.grid)
    band = np.zeros(template.array.shape, bool)
    band[tuple(slice(o, o + n) for o, n in zip(offset, cropped.shape))] = replayed_band(
        LabelMap(cropped, crop_grid, []), case.labels.history)
    outside = int(np.count_nonzero((case.labels.array > 0) & ~band))
    if not outside:
        return None
    return case.file("labels"), f"{outside} of its tumour voxels lie where its recorded edits draw no tumour"


__all__ = ["MIN_TEMPLATE_BRAIN_DICE", "replayed_band", "template_anatomy_problem"]
