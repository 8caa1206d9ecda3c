"""How exported intensities are stored: int16 like BraTS where that loses nothing that matters.

Volume by volume, as **int16** (rounded) when the largest magnitude lies in 256..32767
(rounding then costs under 0.2 % of it) or the voxels are already integers that fit;
otherwise (tiny normalised ranges, or values beyond int16) float32 in NIfTI and, in
DICOM, ``value = stored * RescaleSlope`` with the slope chosen so the largest magnitude
fills the int16 range.  A case folder already holds int16 where this allows
(:mod:`MedSynthLib.synthesis.case_folder`), and those voxels pass through unchanged.

A patient's scan with a region inpainted (``exact``) is never rounded: outside the region its
values are the patient's own, kept by ``synthesize --context`` in the scan's stored type (a
float scan, or int16 scaled by ``scl_slope``).  Its NIfTI is float32 unless the values are
integers, and its DICOM slope is the scan's own step where one fits int16, so that
``stored * RescaleSlope`` gives each value back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

@dataclass(frozen=True)
class IntensityEncoding:
    """How one volume is stored: ``value = stored * slope`` (intercept 0 keeps background exactly 0)."""

    nifti: np.ndarray  # int16 or float32: what the NIfTI export holds
    stored: np.ndarray  # int16: DICOM stored values
    slope: float


def patient_scan(provenance: Mapping[str, Any]) -> bool:
    """The case's images are a real patient's scan with one region re-rendered (``synthesize --context``)."""
    privacy = provenance.get("privacy") or {}
    return bool(provenance.get("inpainting")) or privacy.get("images") == "patient"


def _lattice_slope(values: np.ndarray) -> float | None:
    """The step ``s`` (as DS text holds it) with every value ``n * s``, integer ``|n|`` <= 32767, at float32
    precision; None when there is none.  The step is the smallest gap between the distinct magnitudes (0 included)."""
    from pydicom.valuerep import format_number_as_ds

    magnitudes = np.unique(np.abs(values[values != 0]))
    if magnitudes.size == 0:
        return None
    step = float(np.min(np.diff(magnitudes, prepend=0.0)))
    # A float32 scan's step (0.1 held as 0.100000001...) is its shortest float32 decimal, "0.1".
    for slope in (float(str(np.float32(step))), float(format_number_as_ds(step))):
        if slope <= 0 or len(format_number_as_ds(slope)) > 16:
            continue
        counts = np.rint(values / slope)
        if np.max(np.abs(counts)) <= 32767 and np.array_equal((counts * slope).astype(np.float32),
                                                              values.astype(np.float32)):
            return slope
    return None


def encode_intensities(array: np.ndarray, exact: bool = False) -> IntensityEncoding:
    """int16 (rounded, slope 1) where that loses nothing that matters, else float32 + int16 rescale.

    ``exact``: a patient's scan; int16 only for integers that fit, never rounded (see the module's docstring).
    """
    from pydicom.valuerep import format_number_as_ds

    from ..schema.volume_io import compact_intensities

    values = np.asarray(array, dtype=np.float64)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if exact:
        integers = peak <= 32767 and bool(np.array_equal(values, np.round(values)))
        compact = values.astype(np.int16) if integers else values.astype(np.float32)
    else:
        compact = compact_intensities(values)
    if compact.dtype == np.int16:
        return IntensityEncoding(compact, compact, 1.0)
    # One count of headroom: the 16-character DS text of the slope may round it down a little.
    slope = (_lattice_slope(values) if exact else None) or float(format_number_as_ds(peak / 32766.0))
    stored = np.clip(np.round(values / slope), -32768, 32767).astype(np.int16)
    return IntensityEncoding(values.astype(np.float32), stored, slope)
