"""The T1-only tissue model (``kmeans-t1``) and the :class:`AnatomyModel` protocol.

Three Gaussian classes estimated by k-means with a pooled variance, regularised by a Potts
Markov random field.  Kept by name for comparison and as the T1-only fallback of the
atlas model; it follows the scanner's bias field and weak T1 contrasts (docs/anatomy_check.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage



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
    """Three Gaussian tissue classes on the T1 with a mean-field Potts prior (the former default).

    The classes are estimated by k-means (deterministic quantile initialisation,
    as Atropos initialises its EM) with one pooled standard deviation, which is
    what keeps the fit stable on the weak grey/white contrast of clinical T1
    scans; free-variance EM was measured here to collapse one class on such scans.

    Attributes:
        beta: strength of the spatial prior (0 disables it).
        iterations: mean-field iterations.
        exclude_margin_mm: tumour masks are grown by this much before fitting, since
            the T1 just outside an expert contour is still tumour-affected.
        bias_correction: run N4 (on a 4x shrunk image) before fitting.  Off, as the shipped
            synthesis model's training label maps were made (docs/model_card.md); that choice
            was made by how well class means repaint the image, a criterion that rewards
            following the bias field and no longer chooses the anatomy model.
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
