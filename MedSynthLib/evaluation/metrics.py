"""Synthesis fidelity, measured the same way everywhere in MedSynth.

Per modality, inside a mask (the brain: any real modality > 0; or the tumour):
both images are z-scored inside the brain mask, then SSIM (3D Gaussian window,
sigma 1.5 voxels, data range 8) is averaged over the mask, PSNR uses a peak of
8, and MAE is the mean absolute z-score difference.
"""

from __future__ import annotations

import numpy as np
import torch

from ..schema.grid import mask_box
from ..synthesis.normalize import zscore

DATA_RANGE = 8.0
SSIM_SIGMA = 1.5
SSIM_KERNEL = 11


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Voxel-wise SSIM map (same shape as the inputs; MONAI's Gaussian-window SSIM, edges padded)."""
    from monai.metrics.regression import compute_ssim_and_cs

    pad = SSIM_KERNEL // 2
    ta = torch.from_numpy(np.pad(a, pad, mode="reflect").astype(np.float32))[None, None]
    tb = torch.from_numpy(np.pad(b, pad, mode="reflect").astype(np.float32))[None, None]
    ssim, _ = compute_ssim_and_cs(ta, tb, spatial_dims=a.ndim, kernel_size=[SSIM_KERNEL] * a.ndim,
                                  kernel_sigma=[SSIM_SIGMA] * a.ndim, data_range=DATA_RANGE,
                                  kernel_type="gaussian", k1=0.01, k2=0.03)
    return ssim[0, 0].numpy()


def fidelity(real: np.ndarray, synthetic: np.ndarray, brain: np.ndarray,
             regions: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """SSIM / PSNR / MAE of one modality inside the brain and inside each extra region.

    Args:
        real, synthetic: (k, j, i) images of one modality.
        brain: mask both images are z-scored in (any real modality > 0).
        regions: more masks to report (e.g. ``{"tumour": ...}``), each within the brain.
    """
    box = mask_box(brain, SSIM_KERNEL)
    zr = zscore(real[box], brain[box])
    zs = zscore(synthetic[box], brain[box])
    ssim = ssim_map(zr, zs)
    out: dict[str, dict[str, float]] = {}
    for name, mask in {"brain": brain, **(regions or {})}.items():
        m = mask[box] & brain[box]
        if not m.any():
            continue
        err = zr[m] - zs[m]
        mse = float(np.mean(err ** 2))
        out[name] = {
            "ssim": float(ssim[m].mean()),
            "psnr": float(10 * np.log10(DATA_RANGE ** 2 / mse)) if mse > 0 else float("inf"),
            "mae": float(np.mean(np.abs(err))),
            "voxels": int(m.sum()),
        }
    return out


def class_mean_baseline(labels: np.ndarray, real: np.ndarray, brain: np.ndarray,
                        class_means: dict[int, float] | None = None) -> np.ndarray:
    """Paint every label class with one intensity (its mean z-score, from ``class_means`` or this image).

    ``real`` is read only when ``class_means`` is None (then its z-score in ``brain`` gives the means).
    """
    z = zscore(real, brain) if class_means is None else None
    out = np.zeros(labels.shape, np.float32)
    for value in np.unique(labels[brain]):
        mask = (labels == value) & brain
        out[mask] = class_means[int(value)] if class_means is not None else z[mask].mean()
    return out
