"""Is a tissue map anatomy?  The criteria MedSynth judges its anatomy models by.

Three checks, none of which looks at how well class means repaint the image
(that rewards a label map that encodes the scanner's bias field):

* :func:`regional_plausibility`: healthy-tissue fractions overall and in each
  octant of the brain (halves about its centre of mass on each axis) within
  the ranges of adult brains;
* :func:`intensity_order`: mean T1 ordered CSF < GM < WM, and CSF the brightest
  class on T2;
* :func:`freesurfer_dice`: agreement with an independent FreeSurfer ``aseg``
  segmentation of a healthy T1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..schema.labels import Label

#: Overall share of healthy tissue allowed per class (inclusive bounds).
OVERALL_RANGES: dict[str, tuple[float, float]] = {"CSF": (0.03, 0.30), "GM": (0.30, 0.60), "WM": (0.25, 0.55)}
#: Per-octant bounds, checked in octants holding at least ``OCTANT_MIN_SHARE`` of the
#: healthy tissue and less than ``OCTANT_MAX_TUMOUR`` tumour.
OCTANT_RANGES: dict[str, tuple[float, float]] = {"GM": (0.20, 0.70), "WM": (0.15, 1.0)}
OCTANT_MIN_SHARE = 0.05
OCTANT_MAX_TUMOUR = 0.30

#: FreeSurfer ``aseg`` labels of each tissue class (the usual mapping).
ASEG_TISSUES: dict[int, tuple[int, ...]] = {
    Label.CSF: (4, 5, 43, 44, 14, 15, 24, 31, 63, 72),
    Label.GM: (3, 42, 8, 47, 10, 11, 12, 13, 49, 50, 51, 52, 17, 18, 53, 54, 26, 58, 28, 60, 80),
    Label.WM: (2, 41, 7, 46, 16, 77, 85, 251, 252, 253, 254, 255),
}

_CLASSES = (("CSF", Label.CSF), ("GM", Label.GM), ("WM", Label.WM))


@dataclass
class Plausibility:
    """The outcome of :func:`regional_plausibility`."""

    overall: dict[str, float]
    octants: list[dict[str, Any]]
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


def regional_plausibility(labels: np.ndarray) -> Plausibility:
    """Check healthy-tissue fractions overall and per octant of a MedSynth label map.

    Args:
        labels: ``(k, j, i)`` MedSynth labels (0 background, 1-3 anatomy, 4-6 tumour).

    Returns:
        The fractions and a list of human-readable failures (empty when plausible).
    """
    healthy = (labels >= Label.CSF) & (labels <= Label.WM)
    brain = labels > Label.BACKGROUND
    total = max(int(healthy.sum()), 1)
    overall = {name: float((labels == value).sum() / total) for name, value in _CLASSES}
    failures = [f"overall {name} {overall[name]:.1%} outside {lo:.0%}-{hi:.0%}"
                for name, (lo, hi) in OVERALL_RANGES.items() if not lo <= overall[name] <= hi]
    centre = np.rint(np.argwhere(brain).mean(axis=0)).astype(int) if brain.any() else np.zeros(3, int)
    octants = []
    for octant in range(8):
        box = tuple(slice(None, c) if (octant >> axis) & 1 == 0 else slice(c, None)
                    for axis, c in enumerate(centre))
        sub, sub_healthy, sub_brain = labels[box], healthy[box], brain[box]
        n_healthy, n_brain = int(sub_healthy.sum()), int(sub_brain.sum())
        share = n_healthy / total
        tumour = 1.0 - n_healthy / n_brain if n_brain else 0.0
        fractions = {name: float((sub == value).sum() / max(n_healthy, 1)) for name, value in _CLASSES}
        checked = share >= OCTANT_MIN_SHARE and tumour < OCTANT_MAX_TUMOUR
        octants.append({"octant": octant, "share": share, "tumour": tumour, "checked": checked, **fractions})
        if checked:
            failures += [f"octant {octant} {name} {fractions[name]:.1%} outside {lo:.0%}-{hi:.0%}"
                         for name, (lo, hi) in OCTANT_RANGES.items() if not lo <= fractions[name] <= hi]
    return Plausibility(overall, octants, failures)


def class_means(labels: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """Mean intensity of each anatomy class."""
    return {name: float(image[labels == value].mean()) if (labels == value).any() else float("nan")
            for name, value in _CLASSES}


def intensity_order(labels: np.ndarray, images: dict[str, np.ndarray]) -> list[str]:
    """Failures of the contrast order: T1 CSF < GM < WM; T2 CSF brightest (when T2 is given)."""
    failures = []
    t1 = class_means(labels, images["t1"])
    if not t1["CSF"] < t1["GM"] < t1["WM"]:
        failures.append("T1 means not CSF < GM < WM ({CSF:.0f}, {GM:.0f}, {WM:.0f})".format(**t1))
    if "t2" in images:
        t2 = class_means(labels, images["t2"])
        if not t2["CSF"] > max(t2["GM"], t2["WM"]):
            failures.append("T2 CSF not brightest ({CSF:.0f}, {GM:.0f}, {WM:.0f})".format(**t2))
    return failures


def aseg_to_tissue(aseg: np.ndarray) -> np.ndarray:
    """FreeSurfer ``aseg`` labels -> 1 CSF, 2 GM, 3 WM (0 for everything else)."""
    out = np.zeros(aseg.shape, np.uint8)
    for tissue, values in ASEG_TISSUES.items():
        out[np.isin(aseg, values)] = tissue
    return out


def freesurfer_dice(labels: np.ndarray, aseg: np.ndarray) -> dict[str, float]:
    """Dice of each anatomy class against a FreeSurfer ``aseg`` on the same grid.

    Scored on the voxels FreeSurfer gives a tissue class: its ``aseg`` leaves sulcal CSF
    and the meninges unlabelled, so a model's CSF there is neither right nor wrong.
    """
    reference = aseg_to_tissue(aseg)
    scored = reference > 0
    dice = {}
    for name, value in _CLASSES:
        predicted, truth = (labels == value) & scored, reference == value
        denominator = int(predicted.sum() + truth.sum())
        dice[name] = 2.0 * float((predicted & truth).sum()) / denominator if denominator else float("nan")
    return dice


__all__ = ["OVERALL_RANGES", "OCTANT_RANGES", "Plausibility", "regional_plausibility", "class_means",
           "intensity_order", "aseg_to_tissue", "freesurfer_dice"]
