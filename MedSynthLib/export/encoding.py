"""How exported intensities are stored: int16 like BraTS where that loses nothing that matters.

Volume by volume, as **int16** (rounded) when the largest magnitude lies in 256..32767
(rounding then costs under 0.2 % of it) or the voxels are already integers that fit;
otherwise (tiny normalised ranges, or values beyond int16) float32 in NIfTI and, in
DICOM, ``value = stored * RescaleSlope`` with the slope chosen so the largest magnitude
fills the int16 range.  A case folder already holds int16 where this allows
(:mod:`MedSynthLib.synthesis.case_folder`), and those voxels pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True)
class IntensityEncoding:
    """How one volume is stored: ``value = stored * slope`` (intercept 0 keeps background exactly 0)."""

    nifti: np.ndarray  # int16 or float32: what the NIfTI export holds
    stored: np.ndarray  # int16: DICOM stored values
    slope: float


def encode_intensities(array: np.ndarray) -> IntensityEncoding:
    """int16 (rounded, slope 1) where that loses nothing that matters, else float32 + int16 rescale."""
    from pydicom.valuerep import format_number_as_ds

    from ..schema.volume_io import compact_intensities

    values = np.asarray(array, dtype=np.float64)
    compact = compact_intensities(values)
    if compact.dtype == np.int16:
        return IntensityEncoding(compact, compact, 1.0)
    peak = float(np.max(np.abs(values)))
    # One count of headroom: the 16-character DS text of the slope may round it down a little.
    slope = float(format_number_as_ds(peak / 32766.0))
    stored = np.clip(np.round(values / slope), -32768, 32767).astype(np.int16)
    return IntensityEncoding(values.astype(np.float32), stored, slope)
