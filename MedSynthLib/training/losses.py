"""A structural-similarity term for the generator's loss, on the scale MedSynth's metrics use.

Held-out fidelity is scored by SSIM (``evaluation/metrics.py``: Gaussian window of sigma 1.5 voxels,
data range 8 z).  The L1 term alone is minimised by each voxel's conditional median, which SSIM does not
reward where the structure is uncertain; a weighted ``1 - SSIM`` term beside the L1 is the usual remedy in
image restoration (Zhao et al., "Loss functions for image restoration with neural networks", IEEE TCI 2017).

The SSIM map (``evaluation.metrics.gaussian_ssim_map``) is MONAI's (``compute_ssim_and_cs``, tested equal)
computed with a separable Gaussian, one
banded matrix product per axis instead of five 11x11x11 convolutions: on a 4-contrast 64^3 patch on one CPU
thread 0.06 s against MONAI's 0.31-0.35 s, and 0.12 s with its backward pass, where a training step of the
64^3 recipe takes about 0.5 s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..evaluation.metrics import SSIM_KERNEL, gaussian_ssim_map

__all__ = ["gaussian_ssim_map", "masked_ssim_loss"]


def masked_ssim_loss(prediction: torch.Tensor, real: torch.Tensor, weights: torch.Tensor | None,
                     data_range: float, interior: bool = False, contrast: bool = True,
                     offset: float = 0.0) -> torch.Tensor:
    """``1 -`` the mean SSIM over the voxels where the loss counts (``weights``, (B, 1, *spatial)).

    A voxel's SSIM needs its whole window, so only voxels at least ``kernel_size // 2`` from the patch's
    faces count; ``weights`` None counts every such voxel. With ``interior`` a voxel counts only when its whole
    window lies where the weights are non-zero, so no window straddles the region's border (for the brain: a
    window across the brain-to-background edge measures that edge more than the tissue).

    ``offset`` is added to both images first. SSIM's luminance factor compares local means as a ratio, so where the
    images' zero lies in the tissue (the tissue z-scores put it at the healthy tissue's mean) a small level error of
    a window near zero scores as a sign error; an offset that moves zero out of the tissue leaves the levels to the
    L1 and the term to the local contrast and structure.
    """
    ssim = gaussian_ssim_map(prediction.float() + offset, real.float() + offset, data_range, contrast=contrast)
    if weights is None:
        return 1.0 - ssim.mean()
    if interior:
        pool = getattr(F, f"max_pool{weights.dim() - 2}d")
        inside = -pool(-(weights > 0).float(), kernel_size=SSIM_KERNEL, stride=1)  # 1 where the window is all in
    else:
        half = SSIM_KERNEL // 2
        crop = (slice(None), slice(None)) + tuple(slice(half, n - half) for n in weights.shape[2:])
        inside = weights[crop].float()
    total = inside.sum() * ssim.shape[1]
    return 1.0 - (ssim * inside).sum() / total.clamp(min=1e-6)


def class_means(prediction: torch.Tensor, real: torch.Tensor,
                classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per patch, class and contrast, the mean of ``prediction`` and of ``real`` over the class's mask.

    Args:
        prediction, real: (B, C, *spatial) images.
        classes: (B, K, *spatial) 0/1 class masks.

    Returns:
        ``(predicted, target, size)``: the (B, K, C) means (0 for an empty class) and the (B, K) voxel counts.
    """
    weights = classes.float().flatten(2)  # (B, K, N)
    size = weights.sum(-1)  # (B, K)
    counts = size.clamp(min=1.0).unsqueeze(-1)
    predicted = torch.einsum("bkn,bcn->bkc", weights, prediction.float().flatten(2)) / counts
    target = torch.einsum("bkn,bcn->bkc", weights, real.float().flatten(2)) / counts
    return predicted, target, size


def class_level_loss(prediction: torch.Tensor, real: torch.Tensor, classes: torch.Tensor,
                     min_voxels: int = 64) -> torch.Tensor:
    """The mean, over each patch's label classes and the contrasts, of how far the prediction's mean in a class lies
    from the real image's mean there.

    The L1 pulls each voxel towards its conditional median but not a class's level as a whole, and the SSIM term of
    the default of sessions 30-34 pulled grey and white matter apart (docs/model_card.md, sessions 34-35). This term
    holds each class's level in the patch, the quantity the class signal of ``medsynth evaluate`` reports.

    Args:
        prediction, real: (B, C, *spatial) images in the network's units.
        classes: (B, K, *spatial) 0/1 class masks (a one-hot label map times where the loss counts).
        min_voxels: a class with fewer voxels in a patch does not count there (its mean is mostly noise).

    Returns:
        The mean absolute difference of class means; 0 when no class of any patch has ``min_voxels``.
    """
    predicted, target, size = class_means(prediction, real, classes)
    present = (size >= min_voxels).float().unsqueeze(-1)  # (B, K, 1)
    total = present.sum() * prediction.shape[1]
    return ((predicted - target).abs() * present).sum() / total.clamp(min=1.0)


def contrast_pairs(modalities: tuple[str, ...] | list[str]) -> tuple[tuple[int, int, int], ...]:
    """The contrast rules of ``evaluation.image_checks`` as ``(channel, darker class, brighter class)`` triples.

    ``modalities`` gives the network's channel order; a "darkest" or "brightest" rule expands to one pair per other
    class.
    """
    from ..evaluation.image_checks import CONTRAST_RULES, rule_pairs

    pairs = [(list(modalities).index(rule.modality), low, high) for rule in CONTRAST_RULES
             for low, high in rule_pairs(rule)]
    return tuple((channel, int(low), int(high)) for channel, low, high in pairs)


def contrast_order_loss(prediction: torch.Tensor, real: torch.Tensor, classes: torch.Tensor,
                        pairs: tuple[tuple[int, int, int], ...], keep: float = 0.5,
                        min_voxels: int = 64) -> torch.Tensor:
    """How far a rendering's class contrasts fall short of a share of the real patch's, over the contrast rules.

    A code far from the training codes can keep every voxel above the floor and still wash the tissues out (a
    uniformly bright T1 with grey matter level with white matter: docs/model_card.md, "Wide appearance codes").
    For each patch and rule pair whose classes both have ``min_voxels`` and which the real patch itself keeps
    (brighter class mean above the darker one's), the term is ``relu(keep x real difference - predicted
    difference)`` of the class means: the order a radiologist reads must hold with at least ``keep`` of the real
    contrast, whatever the appearance code changes beyond that.

    Args:
        prediction, real: (B, C, *spatial) images in the network's units.
        classes: (B, K, *spatial) 0/1 class masks (a one-hot label map times where the loss counts).
        pairs: ``(channel, darker class, brighter class)`` triples (``contrast_pairs``).
        keep: the share of the real contrast to keep (0: only the order).
        min_voxels: a class with fewer voxels in a patch does not count there.

    Returns:
        The mean shortfall over the counted pairs; 0 when none counts.
    """
    predicted, target, size = class_means(prediction, real, classes)
    present = size >= min_voxels
    channel, darker, brighter = (torch.tensor(column, device=prediction.device) for column in zip(*pairs))
    real_difference = target[:, brighter, channel] - target[:, darker, channel]  # (B, P)
    predicted_difference = predicted[:, brighter, channel] - predicted[:, darker, channel]
    counted = (present[:, darker] & present[:, brighter] & (real_difference > 0)).float()
    shortfall = torch.relu(keep * real_difference - predicted_difference)
    return (shortfall * counted).sum() / counted.sum().clamp(min=1.0)
