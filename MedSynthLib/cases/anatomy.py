"""Brain anatomy (CSF / GM / WM) for every brain voxel outside the tumour.

The default model, :class:`~MedSynthLib.cases.atlas_anatomy.AtlasPriorEM` (``atlas-em``),
fits T1, T2 and FLAIR together after N4 bias correction, with ICBM152 tissue
priors registered to the case, by EM and a Potts Markov random field; with T1
alone it runs on that one channel.  The earlier T1-only k-means model
(:class:`GaussianMixtureMRF`, ``kmeans-t1``) stays available by name for
comparison: it follows the scanner's bias field and weak T1 contrasts
(docs/anatomy_check.md).  Any :class:`AnatomyModel` -- such as a learned
T1 -> anatomy network, the first GAN of Shin et al. 2018 -- can replace them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..schema.errors import InputError
from ..schema.grid import AxisOrder, Grid, LabelMap
from ..schema.labels import SCHEMA_VERSION, Label
from .atlas_anatomy import AtlasPriorEM
from .kmeans_anatomy import AnatomyModel, GaussianMixtureMRF
from .readers import Case


def segment_anatomy(model: AnatomyModel, images: dict[str, np.ndarray], brain: np.ndarray, exclude: np.ndarray,
                    grid: Grid) -> np.ndarray:
    """CSF/GM/WM (1/2/3) on every brain voxel from whichever images ``model`` uses.

    The models run in LPS axis order (:class:`~MedSynthLib.schema.grid.AxisOrder`), so a case stored otherwise
    (a RAS NIfTI) gets the same anatomy: on the stored order 1.9 % of BraTS2021_00000's brain voxels changed
    class when it was stored RAS.
    """
    order = AxisOrder.from_grid(grid)
    if not order.is_identity:
        def lps(array: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(order.to_training(array))

        anatomy = segment_anatomy(model, {m: lps(image) for m, image in images.items()}, lps(brain), lps(exclude),
                                  order.training_grid(grid))
        return np.ascontiguousarray(order.to_stored(anatomy))
    if hasattr(model, "segment_images"):
        return model.segment_images(images, brain, exclude, grid)
    return model.segment(images["t1"], brain, exclude, grid.spacing)


def derive_label_map(case: Case, model: AnatomyModel | None = None) -> LabelMap:
    """The MedSynth 7-class label map of a case.

    Anatomy comes from ``model`` inside the brain mask; tumour voxels are copied
    exactly from the case's segmentation.  The grid is the case's own.  The record
    names the model that ran with its settings and the contrasts it fitted; when that
    is a fallback (atlas-em on a case read without T2/FLAIR runs the T1 k-means model)
    ``anatomy_fallback`` names the model asked for and why it did not run.

    Raises:
        InputError: an empty brain, a contrast of one value or of a handful of values in the brain (a label map or
            segmentation given as an image), an atlas registration that failed, or a result without white matter
            (naming the T1).
    """
    from .atlas_anatomy import RegistrationError

    model, fallback = fitted_anatomy_model(model or DEFAULT_ANATOMY_MODEL, case.images)
    contrasts = anatomy_contrasts(model, case.images)
    brain = case.brain_mask()
    if not brain.any():
        raise InputError(case.files.get("t1"), "empty brain: every modality is zero everywhere")
    tumour = case.tumour if case.tumour is not None else np.zeros(case.grid.shape, np.uint8)
    healthy = brain & (tumour == 0)
    for modality in contrasts:
        values = case.images[modality][healthy]
        if values.size and values.min() == values.max():  # a fit would still return labels: all of one class
            raise InputError(case.files.get(modality), f"no contrast: every {modality} voxel of the brain holds "
                                                       f"{float(values[0]):g}, no tissue to tell apart")
        levels = few_levels(values)
        if levels is not None:
            shown = ", ".join(f"{v:g}" for v in levels[:6]) + (", ..." if levels.size > 6 else "")
            raise InputError(case.files.get(modality), f"only {levels.size} distinct values in the brain ({shown}): "
                                                       f"a label map or segmentation, not an MR image; give the "
                                                       f"{modality.upper()} scan")
    try:
        anatomy = segment_anatomy(model, case.images, brain, tumour > 0, case.grid)
    except RegistrationError as exc:
        raise InputError(case.files.get("t1"), str(exc)) from None
    if healthy.any() and not np.any(anatomy[healthy] == Label.WM):
        # A map without white matter is no brain's anatomy (synthesize refuses it): said of the scans, not later.
        shares = ", ".join(f"{label.name} {np.mean(anatomy[healthy] == label):.0%}" for label in (Label.CSF, Label.GM))
        raise InputError(case.files.get("t1"), f"the anatomy derived from {', '.join(c.upper() for c in contrasts)} "
                                               f"holds no white matter ({shares}): not a brain MR image?")
    labels = np.where(tumour > 0, tumour, anatomy).astype(np.uint8)
    labels[~brain] = Label.BACKGROUND
    params: dict[str, Any] = {"convention": case.convention, "label_convention": case.label_convention,
                              "anatomy_model": model.to_json(), "anatomy_contrasts": contrasts,
                              # without one, a tumour in the scan is labelled as tissue: "no tumour" is not known
                              "tumour_segmentation": case.tumour is not None}
    if fallback is not None:
        params["anatomy_fallback"] = fallback
    return LabelMap(labels, case.grid, [{"name": "derive_labels", "params": params, "schema_version": SCHEMA_VERSION}])


#: Noise alone gives a brain MR image hundreds of grey levels at any bit depth; an image with at most this many
#: distinct values over at least :data:`MIN_VOXELS_FOR_LEVELS` brain voxels is a label map, mask or segmentation.
MAX_LABEL_LEVELS = 64
MIN_VOXELS_FOR_LEVELS = 1000


def few_levels(values: np.ndarray) -> np.ndarray | None:
    """The distinct values of an image's brain voxels when they are so few that it is no MR image, else ``None``."""
    if values.size < MIN_VOXELS_FOR_LEVELS:
        return None
    step = max(1, values.size // 100_000)  # a sample settles a real image's count at once
    if step > 1 and np.unique(values[::step]).size > MAX_LABEL_LEVELS:
        return None
    levels = np.unique(values)
    return levels if levels.size <= MAX_LABEL_LEVELS else None


def fitted_anatomy_model(model: AnatomyModel,
                         images: dict[str, np.ndarray]) -> tuple[AnatomyModel, dict[str, Any] | None]:
    """The model that labels ``images`` and, when that is not ``model``, the note of why it fell back.

    atlas-em without T2 and FLAIR runs the T1 k-means model with that model's own settings; recording the
    requested model's settings would describe a fit that never ran.
    """
    fitted_model = getattr(model, "fitted_model", None)
    fitted = fitted_model(images) if fitted_model is not None else model
    if fitted is model:
        return model, None
    return fitted, {"requested_model": model.name, "reason": "missing_contrasts",
                    "missing_contrasts": model.missing_contrasts(images)}


def anatomy_contrasts(model: AnatomyModel, images: dict[str, np.ndarray]) -> list[str]:
    """The contrasts ``model`` fits on these images."""
    used = getattr(model, "used_contrasts", None)
    return list(used(images)) if used is not None else ["t1"]


def tissue_statistics(labels: np.ndarray, t1: np.ndarray) -> dict[str, dict[str, float]]:
    """Fraction of healthy brain tissue and mean T1 of each anatomy class."""
    anatomy = np.isin(labels, (Label.CSF, Label.GM, Label.WM))
    total = max(int(anatomy.sum()), 1)
    stats = {}
    for label in (Label.CSF, Label.GM, Label.WM):
        mask = labels == label
        stats[label.name] = {"fraction": float(mask.sum() / total),
                             "mean_t1": float(t1[mask].mean()) if mask.any() else float("nan")}
    return stats


#: Anatomy models by name (the benchmark and ``--anatomy`` choose among them).
ANATOMY_MODELS: dict[str, AnatomyModel] = {"atlas-em": AtlasPriorEM(), "kmeans-t1": GaussianMixtureMRF()}
#: The model ``medsynth labels``, training and the study use.
DEFAULT_ANATOMY_MODEL: AnatomyModel = ANATOMY_MODELS["atlas-em"]
