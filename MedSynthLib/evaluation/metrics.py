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


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(dtype=dtype, device=device)


def _blur(image: torch.Tensor, kernel_1d: torch.Tensor) -> torch.Tensor:
    """Valid (unpadded) Gaussian filtering of (B, C, *spatial) along each spatial axis in turn.

    Each pass is a product with a banded matrix (rows: output voxels, columns: input voxels), which a CPU
    runs as one matrix multiplication.
    """
    size = kernel_1d.numel()
    out = image
    for axis in range(2, image.dim()):
        n = out.shape[axis]
        band = torch.zeros(n - size + 1, n, dtype=image.dtype, device=image.device)
        for row in range(n - size + 1):
            band[row, row:row + size] = kernel_1d
        out = torch.movedim(torch.matmul(band, torch.movedim(out, axis, -2)), -2, axis)
    return out


def gaussian_ssim_map(prediction: torch.Tensor, target: torch.Tensor, data_range: float,
                      sigma: float = SSIM_SIGMA, kernel_size: int = SSIM_KERNEL,
                      k1: float = 0.01, k2: float = 0.03, contrast: bool = True) -> torch.Tensor:
    """SSIM map of (B, C, *spatial) images, each channel on its own, without padding.

    Args:
        prediction, target: images of the same shape, 1-3 spatial dimensions.
        data_range: the range the stability constants refer to, in the images' units.
        sigma, kernel_size: the Gaussian window (MedSynth's metrics: 1.5 voxels, 11 taps).
        contrast: the full SSIM (luminance x contrast x structure). False: luminance x structure, the local
            correlation without the factor that compares the two local spreads (``TrainConfig.ssim_contrast``).

    Returns:
        (B, C, *spatial) map shrunk by ``kernel_size - 1`` along each spatial axis.
    """
    kernel_1d = _gaussian_1d(kernel_size, sigma, prediction.dtype, prediction.device)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    # The five local means in one filtering pass.
    stacked = torch.cat([prediction, target, prediction * prediction, target * target, prediction * target], 1)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = _blur(stacked, kernel_1d).chunk(5, dim=1)
    sigma_x = mu_xx - mu_x * mu_x
    sigma_y = mu_yy - mu_y * mu_y
    sigma_xy = mu_xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    if not contrast:
        c3 = c2 / 2
        spreads = (sigma_x.clamp(min=0) * sigma_y.clamp(min=0) + 1e-12).sqrt()
        return luminance * (sigma_xy + c3) / (spreads + c3)
    return luminance * ((2 * sigma_xy + c2) / (sigma_x + sigma_y + c2))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Voxel-wise SSIM map (same shape as the inputs; MONAI's Gaussian-window SSIM, edges padded by reflection).

    The separable filtering of :func:`gaussian_ssim_map`: MONAI's 11x11x11 convolutions took 35-40 s per contrast
    of a BraTS brain on the 2-core development machine, most of ``medsynth evaluate``'s time.
    """
    pad = SSIM_KERNEL // 2
    ta = torch.from_numpy(np.pad(a, pad, mode="reflect").astype(np.float32))[None, None]
    tb = torch.from_numpy(np.pad(b, pad, mode="reflect").astype(np.float32))[None, None]
    with torch.no_grad():
        return gaussian_ssim_map(ta, tb, DATA_RANGE)[0, 0].numpy()


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
