"""Checks a radiologist would make on a (synthetic or real) case, as numbers.

* **Contrast rules**: the order of tissue signals per modality, read from the
  median z-score (inside the brain) of each label class: on T1, CSF < GM < WM and
  necrosis darker than white matter; on T2, CSF the brightest healthy tissue and oedema brighter than
  white matter; on FLAIR, CSF darkest and oedema brighter than grey matter; on
  T1ce, enhancing tumour brighter than white matter.  Medians do not change under
  a positive linear intensity map, so the rules hold on any scanner scale.
* **Checkerboard**: the power of the period-2 patterns (the highest spatial
  frequency on each axis and their combinations) that a stride-2 transposed
  convolution leaves, compared between a synthetic image and the real one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..schema.labels import Label
from ..synthesis.normalize import zscore


@dataclass(frozen=True)
class ContrastRule:
    """``median(darker) < median(brighter)`` on ``modality``, for every listed class pair.

    Attributes:
        name: short readable statement of the rule.
        modality: t1, t1ce, t2 or flair.
        darker: classes that must be darker.
        brighter: classes that must be brighter than every class in ``darker``.
        against_all: when set, the one class in ``darker`` (or ``brighter``) is compared with every
            other class present in the brain (``"brightest"`` / ``"darkest"`` rules).
    """

    name: str
    modality: str
    darker: tuple[int, ...]
    brighter: tuple[int, ...]
    against_all: str | None = None


#: The label classes the contrast rules compare (every class of the brain).
RULE_CLASSES = tuple(int(v) for v in (Label.CSF, Label.GM, Label.WM, Label.NCR, Label.ED, Label.ET))

CONTRAST_RULES: tuple[ContrastRule, ...] = (
    ContrastRule("T1: CSF < GM", "t1", (Label.CSF,), (Label.GM,)),
    ContrastRule("T1: GM < WM", "t1", (Label.GM,), (Label.WM,)),
    ContrastRule("T1: NCR < WM", "t1", (Label.NCR,), (Label.WM,)),
    # CSF is the brightest *healthy* tissue on T2.  Against every class it fails on 21 of the 27 real
    # cases: necrosis, oedema and enhancing tumour are often brighter than the median of the CSF class,
    # which also holds partial-volume voxels (measured by benchmarks/measure_normalization.py).
    ContrastRule("T2: CSF brightest", "t2", (Label.GM, Label.WM), (Label.CSF,)),
    ContrastRule("T2: ED > WM", "t2", (Label.WM,), (Label.ED,)),
    ContrastRule("FLAIR: CSF darkest", "flair", (Label.CSF,), (), against_all="darkest"),
    ContrastRule("FLAIR: ED > GM", "flair", (Label.GM,), (Label.ED,)),
    ContrastRule("T1ce: ET > WM", "t1ce", (Label.WM,), (Label.ET,)),
)


def class_medians(image: np.ndarray, labels: np.ndarray, brain: np.ndarray,
                  min_voxels: int = 20, frame: np.ndarray | None = None) -> dict[int, float]:
    """Median z-score of every label class with at least ``min_voxels`` voxels.

    Args:
        frame: z-score with this image's mean and standard deviation inside ``brain`` (e.g. the real image, for
            a synthetic one in the same units); default ``image``'s own.
    """
    z = zscore(image, brain, reference=frame)
    medians = {}
    for value in RULE_CLASSES:
        mask = (labels == value) & brain
        if int(mask.sum()) >= min_voxels:
            medians[value] = float(np.median(z[mask]))
    return medians


def rule_pairs(rule: ContrastRule, classes: tuple[int, ...] = RULE_CLASSES) -> list[tuple[int, int]]:
    """The ``(darker, brighter)`` class pairs ``rule`` compares; a "brightest" or "darkest" rule compares its class
    with every other one of ``classes`` (those present in the case when checking one)."""
    if rule.against_all == "brightest":
        return [(other, rule.brighter[0]) for other in classes if other != rule.brighter[0]]
    if rule.against_all == "darkest":
        return [(rule.darker[0], other) for other in classes if other != rule.darker[0]]
    return [(low, high) for low in rule.darker for high in rule.brighter]


def check_contrast_rules(images: dict[str, np.ndarray], labels: np.ndarray, brain: np.ndarray | None = None,
                         tolerance: float = 0.0, rules: tuple[ContrastRule, ...] = CONTRAST_RULES,
                         min_voxels: int = 20) -> list[dict[str, Any]]:
    """Evaluate the contrast rules on one case.

    Args:
        images: modality -> (k, j, i) image (any intensity scale).
        labels: (k, j, i) MedSynth label map on the same grid.
        brain: mask to z-score in (default: the label map's brain, ``labels > 0``).
        tolerance: a comparison passes when ``brighter - darker > -tolerance`` (in z); 0 is strict.
        rules: the rules to check.
        min_voxels: classes smaller than this are treated as absent.

    Returns:
        one entry per rule: ``rule``, ``modality``, ``passed`` (``None`` when a class it needs is absent),
        ``margin`` (smallest brighter - darker difference, z), ``pairs`` (each comparison), and the
        class ``medians`` of that modality (by class name).
    """
    brain = labels > Label.BACKGROUND if brain is None else brain
    medians_by_modality = {m: class_medians(images[m], labels, brain, min_voxels)
                           for m in {rule.modality for rule in rules}}
    results = []
    for rule in rules:
        medians = medians_by_modality[rule.modality]
        pairs = rule_pairs(rule, tuple(medians))
        needed = {v for pair in pairs for v in pair} | set(rule.darker) | set(rule.brighter)
        entry: dict[str, Any] = {"rule": rule.name, "modality": rule.modality,
                                 "medians": {Label(v).name: round(z, 4) for v, z in sorted(medians.items())}}
        if not needed <= set(medians) or not pairs:
            entry.update(passed=None, margin=None, pairs=[])
        else:
            differences = [(Label(low).name, Label(high).name, medians[high] - medians[low]) for low, high in pairs]
            margin = min(d for _, _, d in differences)
            entry.update(passed=bool(margin > -tolerance), margin=round(margin, 4),
                         pairs=[{"darker": a, "brighter": b, "difference": round(d, 4)} for a, b, d in differences])
        results.append(entry)
    return results


def _parity_patterns(ndim: int) -> list[tuple[int, ...]]:
    """Every non-zero combination of the Nyquist frequency (1) or 0 per axis."""
    return [p for p in itertools.product((0, 1), repeat=ndim) if any(p)]


def nyquist_power(image: np.ndarray, mask: np.ndarray, sigma: float = 2.0) -> float:
    """Mean power of the period-2 patterns inside ``mask`` (image z-scored in the mask).

    Each pattern ``(-1)^(a k + b j + c i)`` is demodulated (multiplied in) and
    low-passed with a Gaussian of ``sigma`` voxels, which keeps the signal within
    about ``1 / (2 pi sigma)`` cycles of that corner of the spectrum; the squared
    result, summed over the patterns, is averaged over the mask eroded by the
    filter's reach (the step at the mask's edge has power at every frequency).
    """
    from scipy import ndimage

    from ..schema.grid import mask_box

    truncate = 3.0
    reach = int(np.ceil(truncate * sigma))
    box = mask_box(mask, reach + 1)
    sub_mask = mask[box]
    inner = ndimage.binary_erosion(sub_mask, iterations=reach)
    if not inner.any():
        inner = sub_mask
    z = zscore(image[box], sub_mask)  # 0 outside the mask
    grids = np.indices(z.shape, sparse=True)
    total = 0.0
    for pattern in _parity_patterns(z.ndim):
        parity = sum(a * g for a, g in zip(pattern, grids)) % 2
        sign = 1.0 - 2.0 * parity
        low = ndimage.gaussian_filter((z * sign).astype(np.float32), sigma, mode="constant", truncate=truncate)
        total += float(np.mean(low[inner].astype(np.float64) ** 2))
    return total


def outermost_layer(brain: np.ndarray) -> np.ndarray:
    """The brain's outermost voxel layer: brain voxels with a face neighbour outside it.

    In a skull-stripped real scan every one of them carries signal; a synthesis model that undershoots at the
    brain's border leaves some at 0 (docs/model_card.md).
    """
    from scipy import ndimage

    brain = np.asarray(brain, dtype=bool)
    return brain & ~ndimage.binary_erosion(brain)


def layer_signal_shares(images: dict[str, np.ndarray], layer: np.ndarray,
                        floors: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Per contrast, the share of ``layer``'s voxels at 0 and the share at or below the contrast's floor.

    With :func:`outermost_layer` this is how the model card and the tests count a dark brain border.
    """
    zero = {m: float(np.mean(image[layer] == 0)) for m, image in images.items()}
    at_floor = {m: float(np.mean(image[layer] <= floors[m])) for m, image in images.items()}
    return zero, at_floor


def checkerboard_ratio(real: np.ndarray, synthetic: np.ndarray, mask: np.ndarray, sigma: float = 2.0) -> float:
    """Period-2 power of ``synthetic`` relative to ``real`` (1: the same; the target is at most 1.2)."""
    return checkerboard_ratio_to(nyquist_power(real, mask, sigma), synthetic, mask, sigma)


def checkerboard_ratio_to(real_power: float, synthetic: np.ndarray, mask: np.ndarray, sigma: float = 2.0) -> float:
    """:func:`checkerboard_ratio` against the real image's :func:`nyquist_power` already measured (same mask and
    sigma), for several synthetic images compared with one real image."""
    return nyquist_power(synthetic, mask, sigma) / real_power if real_power > 0 else float("inf")
