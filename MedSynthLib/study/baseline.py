"""The FLAIR-threshold baseline: the gate every learned segmenter of the study must pass.

Whole tumour = brain voxels whose brain-z-scored FLAIR exceeds one threshold, fitted on
the fold's training cases only (the threshold of best mean whole-tumour Dice over a grid
of candidates); the ``largest component`` variant keeps the largest connected component.
It predicts the whole tumour only (TC and ET are left empty and score accordingly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..schema.labels import Label

#: Channel of FLAIR in a study case's images (t1, t1ce, t2, flair).
FLAIR = 3
#: Candidate thresholds (brain z-scores) searched on the training cases.
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.25, 4.01, 0.05), 2))
VARIANTS = ("threshold", "largest_component")


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == (int(np.argmax(sizes)) + 1)


def predict_whole_tumour(images: np.ndarray, labels: np.ndarray, threshold: float, variant: str) -> np.ndarray:
    """Boolean whole-tumour mask of one case; ``labels`` only give the brain (non-zero)."""
    mask = (np.asarray(images[FLAIR]) > threshold) & (np.asarray(labels) > Label.BACKGROUND)
    return _largest_component(mask) if variant == "largest_component" and mask.any() else mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


@dataclass
class FlairThreshold:
    """A fitted baseline: the threshold and the training Dice it reached."""

    variant: str
    threshold: float
    training_dice: float

    def predict(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(3, k, j, i) WT / TC / ET masks (TC and ET empty)."""
        wt = predict_whole_tumour(images, labels, self.threshold, self.variant)
        empty = np.zeros_like(wt)
        return np.stack([wt, empty, empty])

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "threshold": self.threshold, "training_dice": self.training_dice}


def fit(cases: Sequence[Any], variant: str, thresholds: Sequence[float] = THRESHOLDS) -> FlairThreshold:
    """Fit the threshold on training cases (objects with ``images`` and ``labels``)."""
    if variant not in VARIANTS:
        raise ValueError(f"baseline variant {variant!r}: one of {VARIANTS}")
    truths = [np.asarray(c.labels) >= Label.NCR for c in cases]
    best = (-1.0, thresholds[0])
    for t in thresholds:
        dice = float(np.mean([_dice(predict_whole_tumour(c.images, c.labels, t, variant), truth)
                              for c, truth in zip(cases, truths)]))
        if dice > best[0]:
            best = (dice, float(t))
    return FlairThreshold(variant, best[1], best[0])


__all__ = ["FlairThreshold", "fit", "predict_whole_tumour", "VARIANTS", "THRESHOLDS", "FLAIR"]
