"""Brain anatomy (CSF / GM / WM) for every brain voxel outside the tumour.

The default model is unsupervised: a three-class Gaussian mixture on the T1
intensities of healthy-looking brain, regularised by a Potts Markov random
field solved with mean-field iterations (the classic EM + MRF tissue model of
brain MRI segmentation, e.g. Zhang et al., IEEE TMI 20(1), 2001).  Any
:class:`AnatomyModel` — such as a learned T1 -> anatomy network, the first GAN
of Shin et al. 2018 — can replace it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from ..schema.errors import InputError
from ..schema.grid import LabelMap
from ..schema.labels import SCHEMA_VERSION, Label
from .readers import Case


@runtime_checkable
class AnatomyModel(Protocol):
    """Anything that labels brain tissue from a T1 image."""

    name: str

    def segment(self, t1: np.ndarray, brain: np.ndarray, exclude: np.ndarray,
                spacing: tuple[float, float, float]) -> np.ndarray:
        """Label tissue.

        Args:
            t1: (k, j, i) T1 intensities.
            brain: boolean brain mask.
            exclude: boolean mask of voxels whose T1 must not inform the tissue
                model (the tumour); they may get any label, the caller overwrites them.
            spacing: voxel spacing (i, j, k) in mm.

        Returns:
            ``uint8`` array: CSF/GM/WM (1/2/3) on every brain voxel, 0 outside.
        """
        ...

    def to_json(self) -> dict[str, Any]:
        ...


@dataclass(frozen=True)
class GaussianMixtureMRF:
    """Three Gaussian tissue classes on bias-corrected T1 with a mean-field Potts prior.

    The classes are estimated by k-means (deterministic quantile initialisation,
    as Atropos initialises its EM) with one pooled standard deviation, which is
    what keeps the fit stable on the weak grey/white contrast of clinical T1
    scans; free-variance EM was measured here to collapse one class on such scans.

    Attributes:
        beta: strength of the spatial prior (0 disables it).
        iterations: mean-field iterations.
        exclude_margin_mm: tumour masks are grown by this much before fitting, since
            the T1 just outside an expert contour is still tumour-affected.
        bias_correction: run N4 (on a 4x shrunk image) before fitting.  Off by default:
            without it the classes follow the scan's own T1 contrast and explain far more
            of the real images (painting each class with its mean on the held-out
            BraTS2021_00006: brain SSIM 0.330 vs 0.265, T1 alone 0.51 vs 0.32), and the
            shipped model is trained on such label maps (docs/model_card.md).
        max_samples: voxels used to fit the classes (a deterministic stride).
    """

    beta: float = 2.0
    iterations: int = 6
    exclude_margin_mm: float = 3.0
    bias_correction: bool = False
    max_samples: int = 200_000
    name: str = "kmeans-gaussian-mrf"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def segment(self, t1: np.ndarray, brain: np.ndarray, exclude: np.ndarray,
                spacing: tuple[float, float, float]) -> np.ndarray:
        from sklearn.cluster import KMeans

        box = ndimage.find_objects(brain.astype(np.uint8))[0]
        t1b, brainb, excludeb = t1[box].astype(np.float32), brain[box], exclude[box]
        grown = excludeb
        if excludeb.any() and self.exclude_margin_mm > 0:
            outside = ndimage.distance_transform_edt(~excludeb, sampling=spacing[::-1])
            grown = outside <= self.exclude_margin_mm
        fit_mask = brainb & ~grown
        if fit_mask.sum() < 1000:
            fit_mask = brainb & ~excludeb
        if self.bias_correction:
            t1b = _n4_correct(t1b, fit_mask, spacing)
        values = t1b[fit_mask]
        # Robust range: a bright tail (vessels, fat, residual skull) must not claim a class.
        q01, q25, q50, q75 = np.percentile(values, [0.5, 25, 50, 75])
        low, high = q01, min(float(np.percentile(values, 99.5)), q50 + 3.0 * (q75 - q25))
        inliers = values[(values >= low) & (values <= high)]
        sample = inliers[:: max(1, inliers.size // self.max_samples)][:, None]
        init = np.quantile(sample, [0.1, 0.45, 0.85])[:, None]
        kmeans = KMeans(3, init=init, n_init=1, random_state=0).fit(sample)
        means = np.sort(kmeans.cluster_centers_[:, 0])
        assignment = np.argmin(np.abs(sample - means[None, :]), axis=1)
        pooled_std = float(np.sqrt(np.mean((sample[:, 0] - means[assignment]) ** 2))) or 1.0

        x = np.clip(t1b, low, high)
        loglik = np.stack([-0.5 * ((x - m) / pooled_std) ** 2 for m in means]).astype(np.float32)
        informative = brainb & ~excludeb
        q = _softmax(loglik.copy()) * informative
        for _ in range(self.iterations if self.beta > 0 else 0):
            q = _softmax(loglik + self.beta * _neighbour_mean(q)) * informative
        labels_box = (np.argmax(loglik + self.beta * _neighbour_mean(q), axis=0) + 1).astype(np.uint8)
        # Voxels excluded from the model (tumour) take their nearest informative class.
        if excludeb.any():
            _, nearest = ndimage.distance_transform_edt(~informative, sampling=spacing[::-1], return_indices=True)
            labels_box = labels_box[tuple(nearest)]
        labels_box[~brainb] = 0
        out = np.zeros(t1.shape, dtype=np.uint8)
        out[box] = labels_box
        return out


def _n4_correct(t1: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Divide out the N4 bias field, estimated on a 4x shrunk copy for speed."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.maximum(t1, 0).astype(np.float32))
    image.SetSpacing(spacing)
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_image.SetSpacing(spacing)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([30, 30, 30])
    n4.Execute(sitk.Shrink(image, [4, 4, 4]), sitk.Shrink(mask_image, [4, 4, 4]))
    log_bias = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image))
    return (t1 / np.exp(log_bias)).astype(np.float32)


def _neighbour_mean(q: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.uniform_filter(qc, size=3, mode="constant") for qc in q]) * (27.0 / 26.0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=0, keepdims=True)
    return shifted


DEFAULT_ANATOMY_MODEL: AnatomyModel = GaussianMixtureMRF()


def derive_label_map(case: Case, model: AnatomyModel | None = None) -> LabelMap:
    """The MedSynth 7-class label map of a case.

    Anatomy comes from ``model`` on the T1 inside the brain mask; tumour voxels are
    copied exactly from the case's segmentation.  The grid is the case's own.
    """
    model = model or DEFAULT_ANATOMY_MODEL
    brain = case.brain_mask()
    if not brain.any():
        raise InputError(case.files.get("t1"), "empty brain: every modality is zero everywhere")
    tumour = case.tumour if case.tumour is not None else np.zeros(case.grid.shape, np.uint8)
    anatomy = model.segment(case.images["t1"], brain, tumour > 0, case.grid.spacing)
    labels = np.where(tumour > 0, tumour, anatomy).astype(np.uint8)
    labels[~brain] = Label.BACKGROUND
    record = {
        "name": "derive_labels",
        "params": {"convention": case.convention, "label_convention": case.label_convention,
                   "anatomy_model": model.to_json()},
        "schema_version": SCHEMA_VERSION,
    }
    return LabelMap(labels, case.grid, [record])


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
