"""Geometry of the tumour edits: boxes, index <-> physical maps, RAS rotations.

Vectors given by the user (offsets, centres) are RAS millimetres; internally everything is
computed in ITK's LPS millimetres on the case's own grid, so anisotropic spacing and any
direction matrix are handled.  Arrays are numpy ``(k, j, i)``; grids are ``(i, j, k)``.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from ..schema.errors import EditError
from ..schema.grid import Grid, LabelMap, mask_box, ras_to_lps
from ..schema.labels import brain_mask, tumour_mask

#: numpy (k, j, i) <-> grid (i, j, k): the reversal permutation (its own inverse).
REVERSE = np.eye(3)[::-1]
#: RAS axis names of the flips.
AXES = {"LR": 0, "AP": 1, "SI": 2}


def bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive-exclusive ``(k, j, i)`` bounds ``(lo, hi)`` of a mask, or ``None`` when it is empty."""
    try:
        box = mask_box(mask)
    except ValueError:
        return None
    return (np.array([s.start for s in box], dtype=int), np.array([s.stop for s in box], dtype=int))


def crop(array: np.ndarray, lo: Sequence[int], hi: Sequence[int], fill: Any = 0) -> np.ndarray:
    """``array[lo:hi]`` where the box may reach past the array (padded with ``fill``)."""
    lo, hi = np.asarray(lo, int), np.asarray(hi, int)
    out = np.full(tuple(hi - lo), fill, dtype=array.dtype)
    clo = np.maximum(lo, 0)
    chi = np.minimum(hi, array.shape)
    if np.any(chi <= clo):
        return out
    dst = tuple(slice(a - b, c - b) for a, b, c in zip(clo, lo, chi))
    src = tuple(slice(a, c) for a, c in zip(clo, chi))
    out[dst] = array[src]
    return out


def paste(target: np.ndarray, box: np.ndarray, lo: Sequence[int]) -> None:
    """Write ``box`` (placed at ``lo``) into ``target`` in place, dropping what falls outside."""
    lo = np.asarray(lo, int)
    hi = lo + np.asarray(box.shape)
    clo = np.maximum(lo, 0)
    chi = np.minimum(hi, target.shape)
    if np.any(chi <= clo):
        return
    src = tuple(slice(a - b, c - b) for a, b, c in zip(clo, lo, chi))
    dst = tuple(slice(a, c) for a, c in zip(clo, chi))
    target[dst] = box[src]


def grid_diagonal_mm(grid: Grid) -> float:
    """Length of the grid's diagonal in mm: no edit length may exceed it."""
    return float(np.linalg.norm(np.asarray(grid.size, float) * np.asarray(grid.spacing, float)))


def check_length(value_mm: float, name: str, grid: Grid) -> None:
    """Refuse a length (radius, margin, offset) longer than the grid's diagonal, before anything is allocated.

    Raises:
        EditError: ``value_mm`` is larger than the diagonal.
    """
    diagonal = grid_diagonal_mm(grid)
    if value_mm > diagonal:
        raise EditError(f"{name} of {value_mm:.6g} mm is larger than the grid's diagonal ({diagonal:.1f} mm)")


def check_point(point_ras_mm: Sequence[float], name: str, grid: Grid) -> None:
    """Refuse a RAS point farther from the grid's centre than the grid's diagonal.

    Raises:
        EditError: the point is that far off the grid.
    """
    centre_lps = grid.index_to_lps((np.asarray(grid.size, float) - 1.0) / 2.0)
    distance = float(np.linalg.norm(ras_to_lps(point_ras_mm) - centre_lps))
    diagonal = grid_diagonal_mm(grid)
    if distance > diagonal:
        raise EditError(f"{name} {tuple(round(float(v), 1) for v in point_ras_mm)} (RAS mm) is outside the brain: "
                        f"{distance:.6g} mm from the grid's centre, more than the grid's diagonal ({diagonal:.1f} mm)")


def tumour_centre(labelmap: LabelMap) -> np.ndarray:
    """Centroid of all tumour voxels (NCR/ED/ET), in LPS mm.

    Raises:
        EditError: the label map has no tumour.
    """
    box = bounds(tumour_mask(labelmap.array))
    if box is None:
        raise EditError("the label map has no tumour to edit")
    lo, hi = box
    sub = tumour_mask(labelmap.array[tuple(slice(a, b) for a, b in zip(lo, hi))])
    kji = np.argwhere(sub).mean(axis=0) + lo
    return labelmap.grid.index_to_lps(kji[::-1])


def _axis_aligned(grid: Grid) -> bool:
    """The direction matrix is a signed permutation: index-space boxes are physical boxes."""
    direction = np.abs(np.asarray(grid.direction_matrix, float))
    return bool(np.all((direction < 1e-12) | (np.abs(direction - 1.0) < 1e-12)))


def _brain_extremes_lps(labelmap: LabelMap) -> np.ndarray:
    """LPS positions of the first and last brain voxel of every (k, j) row.

    Any linear function of position (so each LPS coordinate) is monotone along a row, so its
    extremes over the brain are among these points: the same min/max as over every brain
    voxel, with two points a row instead of the whole brain.
    """
    box = bounds(brain_mask(labelmap.array))
    if box is None:
        raise EditError("the label map has no brain (all background)")
    lo, hi = box
    mask = brain_mask(labelmap.array[tuple(slice(a, b) for a, b in zip(lo, hi))])
    rows = mask.any(axis=2)
    first = np.argmax(mask, axis=2)[rows]
    last = mask.shape[2] - 1 - np.argmax(mask[:, :, ::-1], axis=2)[rows]
    k, j = np.nonzero(rows)
    kji = np.concatenate([np.stack([k, j, first], axis=1), np.stack([k, j, last], axis=1)]) + lo
    return labelmap.grid.index_to_lps(kji[:, ::-1].astype(float))


def brain_box_lps(labelmap: LabelMap) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box (min, max) of the brain's voxel centres.

    Taken over the voxel centres themselves: on an oblique grid the corners of the
    index-space box lie outside the brain and give a larger, shifted box.
    """
    if _axis_aligned(labelmap.grid):  # the index box's corners are voxel centres of the extremes
        lo, hi = bounds(brain_mask(labelmap.array)) or _no_brain()
        corners_kji = np.array([[a, b, c] for a in (lo[0], hi[0] - 1) for b in (lo[1], hi[1] - 1)
                                for c in (lo[2], hi[2] - 1)], dtype=float)
        lps = labelmap.grid.index_to_lps(corners_kji[:, ::-1])
    else:
        lps = _brain_extremes_lps(labelmap)
    return lps.min(axis=0), lps.max(axis=0)


def brain_centre(labelmap: LabelMap) -> np.ndarray:
    """Centre of the brain's LPS bounding box (:func:`brain_box_lps`), in LPS mm."""
    if _axis_aligned(labelmap.grid):  # the index box's centre: the same point, computed as before (bit for bit)
        lo, hi = bounds(brain_mask(labelmap.array)) or _no_brain()
        return labelmap.grid.index_to_lps(((lo + hi - 1) / 2.0)[::-1])
    low, high = brain_box_lps(labelmap)
    return (low + high) / 2.0


def _no_brain() -> tuple[np.ndarray, np.ndarray]:
    raise EditError("the label map has no brain (all background)")


def index_affine(grid_in: Grid, grid_out: Grid, matrix_lps: np.ndarray, shift_lps: np.ndarray) -> np.ndarray:
    """4x4 map of ``(k, j, i)`` indices for the physical map ``x_out = R @ x_in + t`` (LPS mm)."""
    m_in, m_out_inv = grid_in.index_to_lps_matrix, np.linalg.inv(grid_out.index_to_lps_matrix)
    a_ijk = m_out_inv @ matrix_lps @ m_in
    b_ijk = m_out_inv @ (matrix_lps @ np.asarray(grid_in.origin) + shift_lps - np.asarray(grid_out.origin))
    forward = np.eye(4)
    forward[:3, :3] = REVERSE @ a_ijk @ REVERSE
    forward[:3, 3] = REVERSE @ b_ijk
    return forward


def rotation_ras(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about the RAS x, then y, then z axes (right-handed), as one matrix ``Rz @ Ry @ Rx``.

    The convention of :class:`~MedSynthLib.edits.transforms.Rotate` (scipy's extrinsic ``"xyz"``).
    """
    return Rotation.from_euler("xyz", np.asarray(angles_deg, float), degrees=True).as_matrix()


def euler_xyz_from_rotation(rotation: np.ndarray) -> tuple[float, float, float]:
    """The inverse of :func:`rotation_ras`: angles (degrees) about RAS x, then y, then z.

    At gimbal lock (y = +-90 degrees) only the difference or sum of the x and z angles is
    defined; z is set to 0 and the whole angle put in x.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy's gimbal-lock notice: handled as documented above
        angles = Rotation.from_matrix(np.asarray(rotation, float)).as_euler("xyz", degrees=True)
    return (float(angles[0]), float(angles[1]), float(angles[2]))


def ras_matrix_to_lps(matrix_ras: np.ndarray) -> np.ndarray:
    """A 3x3 linear map written in RAS, rewritten for LPS coordinates."""
    flip = np.diag([-1.0, -1.0, 1.0])
    return flip @ matrix_ras @ flip
