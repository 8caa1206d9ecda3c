"""Per-modality intensity normalisation inside the brain, with its inverse.

MRI intensities have no absolute scale, so each modality is mapped to
``[-1, 1]`` between robust percentiles of the brain (outliers clipped), and the
percentile values are kept so a synthetic image can be returned to a realistic
scanner range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


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

    def inverse(self, normalized: np.ndarray, brain: np.ndarray) -> np.ndarray:
        values = (np.clip(normalized, -1.0, 1.0) + 1.0) / 2.0 * (self.high - self.low) + self.low
        return np.where(brain, values, 0.0).astype(np.float32)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def zscore(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-score inside ``mask`` (0 outside): the scale used by MedSynth's quality metrics."""
    values = image[mask].astype(np.float64)
    std = values.std()
    out = np.zeros(image.shape, dtype=np.float32)
    out[mask] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out
