"""Per-modality intensity normalisation inside the brain, with its inverse.

MRI intensities have no absolute scale, so each modality is mapped to
``[-1, 1]`` for the generator, and the statistics are kept so a synthetic image
can be returned to a realistic scanner range.  Two maps exist:

* ``percentile`` (:class:`IntensityNormalizer`): linear between robust
  percentiles of the whole brain.  A bright tumour or vessel sets the upper
  percentile, so the same healthy tissue lands at different values in
  different cases (measured on the five BraTS 2021 cases: the across-case
  spread of the CSF/GM/WM means is 0.36 of their separation on T1, 0.90 on
  T1ce, 0.87 on FLAIR).
* ``healthy_zscore`` (:class:`HealthyTissueZScore`): z-score against the
  healthy tissue (CSF/GM/WM, tumour excluded), divided by a fixed scale.  The
  same spread falls to 0.07 (T1), 0.44 (T1ce) and 0.18 (FLAIR), so the
  generator is taught one consistent mapping, on nearly the scale MedSynth's
  quality metrics use (they z-score over the whole brain).
* ``tissue_zscore``: the same against grey and white matter only.  On T2,
  CSF's very high and case-dependent signal makes up a median 61 % of the
  healthy-tissue variance (26-70 % across the 27 real cases), which shrinks the
  grey/white contrast in z and moves it from case to case; without CSF in the
  reference, T2's across-case spread of the GM/WM medians falls from 0.45 to
  0.27 of their separation (T1 0.14 -> 0.11, FLAIR 0.77 -> 0.74).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Protocol

import numpy as np

NORMALIZATIONS = ("percentile", "healthy_zscore", "tissue_zscore")
# z = +-12 maps to +-1 (z against CSF + GM + WM).  Measured on the 27 real cases with
# benchmarks/measure_normalization.py (docs/model_card.md): the earlier +-6 clipped up to 35 % of a FLAIR
# tumour (9 % of a T2 one); +-11 is the smallest range that clips under 0.5 % of every tumour in every
# modality (0.39 %, one FLAIR), +-12 leaves a margin (at most 0.17 % of a tumour, 0.04 % of a brain).
ZSCORE_SCALE = 12.0
# z against grey + white matter only (``tissue_zscore``): its standard deviation is 1.3-1.5x smaller, so
# the same tumours reach higher z; +-15 clips at most 0.22 % of a tumour (+-12: 3.4 %).
TISSUE_ZSCORE_SCALE = 15.0
ZSCORE_KINDS = {"healthy_zscore": ZSCORE_SCALE, "tissue_zscore": TISSUE_ZSCORE_SCALE}

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
# A synthetic brain voxel is never darker than real brains are: per training case, this percentile of the brain's
# voxels that carry signal, in z; a model keeps the median over its cases as its floor.  Without it the darkest
# synthetic CSF (FLAIR, T1ce) came out 0, which reads as background to any tool that takes non-zero for brain.
SIGNAL_FLOOR_PERCENTILE = 0.1


class Normalizer(Protocol):
    """A per-modality map between scanner units and the generator's ``[-1, 1]``."""

    def forward(self, image: np.ndarray, brain: np.ndarray) -> np.ndarray: ...

    def inverse(self, normalized: np.ndarray, brain: np.ndarray, floor: float = 0.0) -> np.ndarray: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class IntensityNormalizer:
    """Robust linear map of brain intensities to ``[-1, 1]``; background -> -1.

    Attributes:
        low: intensity at the ``LOW_PERCENTILE`` of the brain, mapped to -1.
        high: intensity at the ``HIGH_PERCENTILE`` of the brain, mapped to +1.
    """

    low: float
    high: float

    @classmethod
    def fit(cls, image: np.ndarray, brain: np.ndarray) -> "IntensityNormalizer":
        values = image[brain]
        if values.size == 0:
            raise ValueError("cannot normalise an empty brain")
        low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
        if not high > low:
            high = low + 1.0  # a constant image: keep the map invertible
        return cls(float(low), float(high))

    def forward(self, image: np.ndarray, brain: np.ndarray) -> np.ndarray:
        scaled = (np.clip(image, self.low, self.high) - self.low) / (self.high - self.low) * 2.0 - 1.0
        return np.where(brain, scaled, -1.0).astype(np.float32)

    def inverse(self, normalized: np.ndarray, brain: np.ndarray, floor: float = 0.0) -> np.ndarray:
        # ``floor`` (the protocol's) changes nothing here: the map's range already starts at the image's own ``low``.
        values = (np.clip(normalized, -1.0, 1.0) + 1.0) / 2.0 * (self.high - self.low) + self.low
        return np.where(brain, values, 0.0).astype(np.float32)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class HealthyTissueZScore:
    """``(x - mean) / std / scale`` clipped to ``[-1, 1]``, statistics from reference tissue; background -> -1.

    Attributes:
        mean: mean intensity of the reference tissue: the healthy brain (CSF, GM, WM) for
            ``healthy_zscore``, grey and white matter for ``tissue_zscore``.
        std: its standard deviation.
        scale: z-score that maps to +-1 (models store theirs; older models keep +-6).
        kind: ``healthy_zscore`` or ``tissue_zscore``.
        floor: the lowest intensity :meth:`inverse` returns in the brain: a model's, from its training cases
            (:func:`signal_floor_z`); None (only the caller's floor) for a case's own normaliser and for models
            trained without it.
    """

    mean: float
    std: float
    scale: float = ZSCORE_SCALE
    kind: str = "healthy_zscore"
    floor: float | None = None

    @classmethod
    def fit(cls, image: np.ndarray, healthy: np.ndarray, kind: str = "healthy_zscore") -> "HealthyTissueZScore":
        """Statistics of ``image`` inside the reference mask ``healthy``, with the default range of ``kind``."""
        values = image[healthy].astype(np.float64)
        if values.size == 0:
            raise ValueError("cannot normalise without healthy brain tissue")
        std = float(values.std())
        return cls(float(values.mean()), std if std > 0 else 1.0, ZSCORE_KINDS[kind], kind)

    @classmethod
    def from_moments(cls, count: int, total: int, total_of_squares: int,
                     kind: str = "healthy_zscore") -> "HealthyTissueZScore":
        """The normaliser of a set of integer intensities given exactly by its count, sum and sum of squares.

        Python integers keep the moments exact, so the statistics are the correctly rounded mean and
        standard deviation whatever order the sums were gathered in (a cache that adds and removes boxes
        of voxels gives the same normaliser as one pass over the whole mask).
        """
        if count <= 0:
            raise ValueError("cannot normalise without healthy brain tissue")
        variance = (count * total_of_squares - total * total) / (count * count)
        std = math.sqrt(variance) if variance > 0 else 0.0
        return cls(total / count, std if std > 0 else 1.0, ZSCORE_KINDS[kind], kind)

    def forward(self, image: np.ndarray, brain: np.ndarray) -> np.ndarray:
        scaled = np.clip((image.astype(np.float32) - self.mean) / (self.std * self.scale), -1.0, 1.0)
        return np.where(brain, scaled, -1.0).astype(np.float32)

    def inverse(self, normalized: np.ndarray, brain: np.ndarray, floor: float = 0.0) -> np.ndarray:
        """Back to intensities, at least ``floor`` and the normaliser's own ``floor`` in the brain: 0 for scanner
        units (the lowest z-scores of a dim CSF voxel may fall below 0); a real case's own minimum where its values
        go below 0 (a z-scored scan); a model's floor the darkest signal of its training brains."""
        values = np.clip(normalized, -1.0, 1.0) * (self.std * self.scale) + self.mean
        lowest = floor if self.floor is None else max(floor, self.floor)
        return np.where(brain, np.maximum(values, lowest), 0.0).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        entry = asdict(self)
        if self.floor is None:
            del entry["floor"]  # as written before floors existed: a case's normaliser, an older model's
        return entry


def signal_floor_z(normalized: np.ndarray, brain: np.ndarray, normalizer: HealthyTissueZScore) -> float:
    """The darkest signal of one case's brain, in z: its :data:`SIGNAL_FLOOR_PERCENTILE` over the brain's
    voxels brighter than 0.1 % of the reference tissue's mean.

    Voxels at the scan's 0 (a contrast's brain mask a little smaller than the label map's) carry no signal and
    are left out.

    Args:
        normalized: the case's image as ``normalizer.forward`` gave it.
        brain: the label map's brain.
    """
    z = normalized[brain].astype(np.float64) * normalizer.scale
    with_signal = z[z * normalizer.std + normalizer.mean > 1e-3 * abs(normalizer.mean)]
    if with_signal.size == 0:
        raise ValueError("no brain voxel carries signal")
    return float(np.percentile(with_signal, SIGNAL_FLOOR_PERCENTILE))


def with_signal_floor(normalizer: HealthyTissueZScore, floor_z: float) -> HealthyTissueZScore:
    """``normalizer`` whose inverse returns at least the intensity of ``floor_z`` (and never below 0)."""
    return replace(normalizer, floor=max(0.0, normalizer.mean + floor_z * normalizer.std))


def normalizer_from_json(data: dict[str, Any]) -> Normalizer:
    """The normaliser a model's ``intensity`` entry describes (no ``kind``: the original percentile map)."""
    data = dict(data)
    kind = data.pop("kind", "percentile")
    if kind in ZSCORE_KINDS:
        return HealthyTissueZScore(**data, kind=kind)
    if kind == "percentile":
        return IntensityNormalizer(**data)
    raise ValueError(f"unknown intensity normalisation {kind!r}")


def mean_normalizer(normalizers: list[Normalizer]) -> Normalizer:
    """One normaliser for a set of training cases: the mean of each statistic (they share a kind)."""
    entries = [n.to_json() for n in normalizers]
    kinds = {e.get("kind", "percentile") for e in entries}
    if len(kinds) != 1:
        raise ValueError(f"training cases mix intensity normalisations {sorted(kinds)}")
    averaged = {k: (float(np.mean([e[k] for e in entries])) if isinstance(v, (int, float)) else v)
                for k, v in entries[0].items()}
    return normalizer_from_json(averaged)


def normalization_of(normalizer: Normalizer) -> str:
    """The normalisation kind (one of :data:`NORMALIZATIONS`) a normaliser belongs to."""
    return str(normalizer.to_json().get("kind", "percentile"))


def fit_case_normalizers(images: Mapping[str, np.ndarray], labels: np.ndarray,
                         normalization: str) -> dict[str, Normalizer]:
    """One real case's own normalisers, fitted as training fits each of its cases.

    Args:
        images: modality -> the case's image in scanner units.
        labels: its MedSynth label map (the z-score kinds take their reference tissue from it).
        normalization: one of :data:`NORMALIZATIONS`.
    """
    reference = reference_tissue(labels, normalization)
    if normalization in ZSCORE_KINDS:
        return {m: HealthyTissueZScore.fit(image, reference, normalization) for m, image in images.items()}
    return {m: IntensityNormalizer.fit(image, reference) for m, image in images.items()}


# What each normalisation kind is fitted on, in words (reference_tissue).
REFERENCE_TISSUE_WORDS = {"healthy_zscore": "healthy CSF, grey or white matter",
                          "tissue_zscore": "grey or white matter", "percentile": "brain"}


def reference_tissue(labels: np.ndarray, normalization: str) -> np.ndarray:
    """The voxels of a MedSynth label map whose intensities fit a case's normaliser of kind ``normalization``:
    healthy CSF, grey and white matter (``healthy_zscore``), grey and white matter (``tissue_zscore``), or the
    whole brain (``percentile``). Empty where the label map lacks them: the case has no normaliser of that kind."""
    from ..schema.labels import Label, brain_mask

    if normalization in ZSCORE_KINDS:
        low = Label.CSF if normalization == "healthy_zscore" else Label.GM
        return (labels >= low) & (labels <= Label.WM)
    if normalization == "percentile":
        return brain_mask(labels)
    raise ValueError(f"unknown intensity normalisation {normalization!r}")


def zscore(image: np.ndarray, mask: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Z-score inside ``mask`` (0 outside): the scale used by MedSynth's quality metrics.

    Args:
        reference: take the mean and standard deviation inside ``mask`` from this image (e.g. the real image, for a
            synthetic one placed in its units) instead of from ``image`` itself.
    """
    values = image[mask].astype(np.float64)
    statistics = values if reference is None else reference[mask].astype(np.float64)
    std = statistics.std()
    out = np.zeros(image.shape, dtype=np.float32)
    out[mask] = (values - statistics.mean()) / (std if std > 0 else 1.0)
    return out
