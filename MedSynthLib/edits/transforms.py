"""Tumour edits: small, replayable, pure functions on a :class:`~MedSynthLib.schema.grid.LabelMap`.

Every edit is a frozen dataclass whose fields are JSON-serialisable parameters
(TorchIO style).  ``edit.apply(labelmap)`` returns a *new* label map whose
``history`` ends with ``edit.to_record()``; the input array is never written.
Records can be turned back into edits with :func:`edit_from_record` and a whole
history re-applied with :func:`replay`, so an edited case is reproducible from
its provenance alone.

Rules every edit keeps (checked by the tests):

* the output holds only schema values 0..6;
* tumour (NCR/ED/ET) only inside the brain of the input (labels > 0) and the
  background is unchanged;
* where a tumour leaves, the healthy anatomy of the input is refilled
  (:func:`healthy_anatomy`), never zeros;
* a tumour core (NCR+ET) pushed out of the brain by more than
  :data:`MAX_OUTSIDE_FRACTION` raises :class:`~MedSynthLib.schema.errors.EditError`;
  smaller overhangs, and oedema outside the brain, are clipped.

Vectors given by the user (offsets, centres) are RAS millimetres; internally
everything is computed in ITK's LPS millimetres on the case's own grid, so
anisotropic spacing and any direction matrix are handled.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..schema.errors import EditError
from ..schema.grid import Grid, LabelMap, lps_to_ras, ras_to_lps
from ..schema.labels import SCHEMA_VERSION, Label

#: Largest fraction of the tumour core an edit may push outside the brain
#: before it is refused (the rest is clipped).
MAX_OUTSIDE_FRACTION = 0.02

_TUMOUR_VALUES = (int(Label.NCR), int(Label.ED), int(Label.ET))
#: Channel order for the one-hot resampling: on a tie argmax takes the first, so
#: inner classes win ties and the nesting NCR < ET < ED is kept at boundaries.
_CHANNEL_ORDER = (int(Label.NCR), int(Label.ET), int(Label.ED))
_FULL_3X3 = np.ones((3, 3, 3), dtype=bool)
#: numpy (k, j, i) <-> grid (i, j, k): the reversal permutation (its own inverse).
_REVERSE = np.eye(3)[::-1]
_AXES = {"LR": 0, "AP": 1, "SI": 2}

EDITS: dict[str, type["Edit"]] = {}


# --- small array helpers ---------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive-exclusive (k, j, i) bounds of a mask, or ``None`` when it is empty.

    Projections are used instead of ``np.nonzero`` on the full volume (much faster
    on a 240x240x155 case).
    """
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        lo.append(hits[0])
        hi.append(hits[-1] + 1)
    return np.asarray(lo, dtype=int), np.asarray(hi, dtype=int)


def _crop(array: np.ndarray, lo: Sequence[int], hi: Sequence[int], fill: Any = 0) -> np.ndarray:
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


def _paste(target: np.ndarray, box: np.ndarray, lo: Sequence[int]) -> None:
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


def _core_count(labels: np.ndarray) -> int:
    return int(np.count_nonzero((labels == Label.NCR) | (labels == Label.ET)))


def _tumour_only(labels: np.ndarray) -> np.ndarray:
    """The tumour sub-labels of a label map, everything else 0."""
    return np.where(labels >= Label.NCR, labels, 0).astype(np.uint8)


# --- shared helpers ------------------------------------------------------------------------


def healthy_anatomy(labels: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """The label map with every tumour voxel refilled by the nearest anatomy label.

    This is the "original anatomy" an edit restores where a tumour leaves: each
    tumour voxel (NCR/ED/ET) takes the label (CSF/GM/WM) of the nearest
    non-tumour anatomy voxel, so the brain never gets holes of background.

    The distance transform runs on the tumour bounding box grown by a margin
    (a full 240x240x155 transform takes seconds).  The margin is doubled until
    every refilled voxel's nearest anatomy is provably closer than anything
    outside the box, so the result equals the full-volume transform.

    Args:
        labels: ``(k, j, i)`` schema label array (not modified).
        spacing: voxel size in mm in the grid's ``(i, j, k)`` order (as
            :attr:`Grid.spacing`); ``None`` means isotropic 1 mm.

    Returns:
        A new ``uint8`` array with values 0..3.  Where the map has no anatomy at
        all (tumour only), tumour voxels become WM.
    """
    labels = np.asarray(labels)
    out = labels.astype(np.uint8, copy=True)
    tumour = labels >= Label.NCR
    box = _bbox(tumour)
    if box is None:
        return out
    sampling = np.ones(3) if spacing is None else np.asarray(spacing, float)[::-1]
    shape = np.asarray(labels.shape)
    lo_t, hi_t = box
    margin = 8
    while True:
        lo = np.maximum(lo_t - margin, 0)
        hi = np.minimum(hi_t + margin, shape)
        full = bool(np.all(lo == 0) and np.all(hi == shape))
        sub = labels[tuple(slice(a, b) for a, b in zip(lo, hi))]
        anatomy = (sub >= Label.CSF) & (sub <= Label.WM)
        if anatomy.any():
            dist, idx = ndimage.distance_transform_edt(~anatomy, sampling=sampling, return_indices=True)
            where = np.nonzero(sub >= Label.NCR)
            if full or _nearest_inside_box(where, dist[where], lo, hi, shape, sampling):
                fill = sub[tuple(idx[a][where] for a in range(3))]
                out[tuple(w + o for w, o in zip(where, lo))] = fill
                return out
        elif full:
            # No anatomy anywhere to copy from: WM is the neutral brain tissue.
            out[tumour] = Label.WM
            return out
        margin *= 2


def _nearest_inside_box(where: tuple[np.ndarray, ...], dist: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                        shape: np.ndarray, sampling: np.ndarray) -> bool:
    """True when no voxel outside the box can be closer than the anatomy found inside it."""
    limit = np.full(dist.shape, np.inf)
    for axis in range(3):
        p = where[axis]
        if lo[axis] > 0:  # voxels exist below the box on this axis
            limit = np.minimum(limit, (p + 1) * sampling[axis])
        if hi[axis] < shape[axis]:
            limit = np.minimum(limit, (hi[axis] - lo[axis] - p) * sampling[axis])
    return bool(np.all(dist <= limit))


def composite(anatomy: np.ndarray, tumour: np.ndarray, brain: np.ndarray, *,
              max_outside_fraction: float = MAX_OUTSIDE_FRACTION, core_lost_voxels: int = 0) -> np.ndarray:
    """Put tumour labels over the anatomy, kept inside the brain.

    Args:
        anatomy: ``(k, j, i)`` labels under the tumour (usually :func:`healthy_anatomy`).
        tumour: same shape, values in {0, 4, 5, 6}: the moved/inserted tumour.
        brain: boolean brain mask (labels > 0 of the edited input).
        max_outside_fraction: largest fraction of the core (NCR+ET) allowed
            outside the brain; beyond it the edit is refused.
        core_lost_voxels: core voxels that already fell off the array while
            moving (they count as outside the brain).

    Returns:
        A new ``uint8`` label array: anatomy inside the brain, 0 outside, tumour
        on top inside the brain (oedema outside the brain is clipped).

    Raises:
        EditError: more than ``max_outside_fraction`` of the core lies outside the brain.
    """
    core = (tumour == Label.NCR) | (tumour == Label.ET)
    counted = core if core.any() or core_lost_voxels else tumour > 0  # an oedema-only tumour is judged whole
    total = int(np.count_nonzero(counted)) + int(core_lost_voxels)
    if total:
        outside = int(np.count_nonzero(counted & ~brain)) + int(core_lost_voxels)
        if outside / total > max_outside_fraction:
            raise EditError(f"tumour edit moves {100.0 * outside / total:.1f}% of the tumour core outside the brain")
    out = np.where(brain, anatomy, 0).astype(np.uint8)
    place = (tumour > 0) & brain
    out[place] = tumour[place]
    return out


def resample_tumour(labels: np.ndarray, forward: np.ndarray,
                    out_shape: Sequence[int]) -> tuple[np.ndarray, int]:
    """Move the tumour sub-labels of a label array under a voxel->voxel affine.

    Labels are resampled as one-hot channels of {NCR, ET, ED} with linear
    interpolation; a voxel is tumour where the summed tumour probability is
    >= 0.5 and takes the most probable class.  This keeps shapes smooth and the
    classes nested better than nearest neighbour.  When the affine is an exact
    voxel permutation (a flip on an axis-aligned grid) nearest neighbour is used
    instead, which keeps every class count exactly.

    Only the tumour bounding box is resampled, into the bounding box of its
    image clipped to the output array (speed: an edit on a 240x240x155 case
    must take well under 1 s).

    Args:
        labels: ``(k, j, i)`` schema labels on the input grid (anatomy is ignored).
        forward: 4x4 homogeneous map from input ``(k, j, i)`` indices to output
            ``(k, j, i)`` indices.
        out_shape: numpy shape of the output grid.

    Returns:
        ``(tumour, core_lost)``: a ``uint8`` array of ``out_shape`` with values in
        {0, 4, 5, 6}, and the number of core voxels that fell outside it
        (exact for translations and flips, estimated from the voxel centres and
        the volume change otherwise).
    """
    out_shape = tuple(int(v) for v in out_shape)
    result = np.zeros(out_shape, dtype=np.uint8)
    box = _bbox(labels >= Label.NCR)
    if box is None:
        return result, 0
    lo_in, hi_in = box[0] - 1, box[1] + 1
    sub = _tumour_only(_crop(labels, lo_in, hi_in))
    forward = np.asarray(forward, float)
    # Image of the input box (voxel edges) -> output box, grown by 2 voxels for interpolation.
    corners = np.array([[lo_in[0] - 0.5 if a else hi_in[0] - 0.5, lo_in[1] - 0.5 if b else hi_in[1] - 0.5,
                         lo_in[2] - 0.5 if c else hi_in[2] - 0.5]
                        for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    mapped = corners @ forward[:3, :3].T + forward[:3, 3]
    # Clipped to the output array: a big scale must not allocate a huge box.
    lo_out = np.maximum(np.floor(mapped.min(axis=0)).astype(int) - 2, 0)
    hi_out = np.minimum(np.ceil(mapped.max(axis=0)).astype(int) + 3, out_shape)
    core_lost = _core_lost_estimate(sub, lo_in, forward, out_shape)
    if np.any(hi_out <= lo_out):
        return result, core_lost
    inverse = np.linalg.inv(forward)
    matrix = inverse[:3, :3]
    # out-box coords -> in-box coords: in_full = A @ (o + lo_out) + b, in_box = in_full - lo_in
    offset = matrix @ lo_out + inverse[:3, 3] - lo_in
    box_shape = tuple(int(v) for v in hi_out - lo_out)
    rounded, rounded_offset = np.round(matrix), np.round(offset)
    is_permutation = (np.allclose(matrix, rounded, atol=1e-6) and np.allclose(offset, rounded_offset, atol=1e-6)
                      and np.all(np.abs(rounded).sum(axis=0) == 1) and np.all(np.abs(rounded).sum(axis=1) == 1))
    if is_permutation:
        moved = ndimage.affine_transform(sub, rounded, rounded_offset, output_shape=box_shape, order=0,
                                         mode="constant", cval=0)
    else:
        channels = np.stack([
            ndimage.affine_transform((sub == value).astype(np.float32), matrix, offset, output_shape=box_shape,
                                     order=1, mode="constant", cval=0.0)
            for value in _CHANNEL_ORDER
        ])
        lut = np.asarray(_CHANNEL_ORDER, dtype=np.uint8)
        moved = np.where(channels.sum(axis=0) >= 0.5, lut[np.argmax(channels, axis=0)], 0).astype(np.uint8)
    _paste(result, moved, lo_out)
    return result, core_lost


def _core_lost_estimate(sub: np.ndarray, lo_in: np.ndarray, forward: np.ndarray, out_shape: tuple[int, ...]) -> int:
    """Core voxels a map pushes off the output array: input core voxel centres landing
    outside it, times the volume change of the map (exact for translations and flips)."""
    core = np.argwhere((sub == Label.NCR) | (sub == Label.ET))
    if core.size == 0:
        return 0
    mapped = (core + lo_in) @ forward[:3, :3].T + forward[:3, 3]
    off = np.any((mapped < -0.5) | (mapped >= np.asarray(out_shape) - 0.5), axis=1)
    n_off = int(np.count_nonzero(off))
    return max(int(round(n_off * abs(np.linalg.det(forward[:3, :3])))), 1) if n_off else 0


def tumour_centre(labelmap: LabelMap) -> np.ndarray:
    """Centroid of all tumour voxels (NCR/ED/ET), in LPS mm.

    Raises:
        EditError: the label map has no tumour.
    """
    box = _bbox(labelmap.array >= Label.NCR)
    if box is None:
        raise EditError("the label map has no tumour to edit")
    lo, hi = box
    sub = labelmap.array[tuple(slice(a, b) for a, b in zip(lo, hi))] >= Label.NCR
    kji = np.argwhere(sub).mean(axis=0) + lo
    return labelmap.grid.index_to_lps(kji[::-1])


def _brain_box_lps(labelmap: LabelMap) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box (min, max) of the brain's voxel centres."""
    box = _bbox(labelmap.array > Label.BACKGROUND)
    if box is None:
        raise EditError("the label map has no brain (all background)")
    lo, hi = box
    corners_kji = np.array([[a, b, c] for a in (lo[0], hi[0] - 1) for b in (lo[1], hi[1] - 1)
                            for c in (lo[2], hi[2] - 1)], dtype=float)
    lps = labelmap.grid.index_to_lps(corners_kji[:, ::-1])
    return lps.min(axis=0), lps.max(axis=0)


def _brain_centre(labelmap: LabelMap) -> np.ndarray:
    """Centre of the brain mask's bounding box (index space), in LPS mm."""
    box = _bbox(labelmap.array > Label.BACKGROUND)
    if box is None:
        raise EditError("the label map has no brain (all background)")
    lo, hi = box
    return labelmap.grid.index_to_lps(((lo + hi - 1) / 2.0)[::-1])


def _index_affine(grid_in: Grid, grid_out: Grid, matrix_lps: np.ndarray, shift_lps: np.ndarray) -> np.ndarray:
    """4x4 map of ``(k, j, i)`` indices for the physical map ``x_out = R @ x_in + t`` (LPS mm)."""
    m_in, m_out_inv = grid_in.index_to_lps_matrix, np.linalg.inv(grid_out.index_to_lps_matrix)
    a_ijk = m_out_inv @ matrix_lps @ m_in
    b_ijk = m_out_inv @ (matrix_lps @ np.asarray(grid_in.origin) + shift_lps - np.asarray(grid_out.origin))
    forward = np.eye(4)
    forward[:3, :3] = _REVERSE @ a_ijk @ _REVERSE
    forward[:3, 3] = _REVERSE @ b_ijk
    return forward


def _move_tumour(labelmap: LabelMap, matrix_lps: np.ndarray, centre_lps: np.ndarray) -> np.ndarray:
    """Apply ``x -> R (x - c) + c`` (LPS) to the tumour and composite it over the healthy anatomy."""
    matrix_lps = np.asarray(matrix_lps, float)
    shift = centre_lps - matrix_lps @ centre_lps
    forward = _index_affine(labelmap.grid, labelmap.grid, matrix_lps, shift)
    tumour, lost = resample_tumour(labelmap.array, forward, labelmap.array.shape)
    if not tumour.any():
        raise EditError("tumour edit leaves no tumour voxel (the tumour became smaller than a voxel)")
    anatomy = healthy_anatomy(labelmap.array, labelmap.grid.spacing)
    return composite(anatomy, tumour, labelmap.array > Label.BACKGROUND, core_lost_voxels=lost)


def rotation_ras(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about the RAS x, then y, then z axes (right-handed), as one matrix ``Rz @ Ry @ Rx``.

    The convention of :class:`Rotate`.
    """
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_xyz_from_rotation(rotation: np.ndarray) -> tuple[float, float, float]:
    """The inverse of :func:`rotation_ras`: angles (degrees) about RAS x, then y, then z."""
    r = np.asarray(rotation, float)
    ay = float(np.arcsin(np.clip(-r[2, 0], -1.0, 1.0)))
    if abs(np.cos(ay)) > 1e-6:
        ax = float(np.arctan2(r[2, 1], r[2, 2]))
        az = float(np.arctan2(r[1, 0], r[0, 0]))
    else:  # gimbal lock: only ax - az (or ax + az) is defined; put it all in ax
        az = 0.0
        ax = float(np.arctan2(-r[1, 2], r[1, 1]))
    return (float(np.degrees(ax)), float(np.degrees(ay)), float(np.degrees(az)))


def _ras_matrix_to_lps(matrix_ras: np.ndarray) -> np.ndarray:
    flip = np.diag([-1.0, -1.0, 1.0])
    return flip @ matrix_ras @ flip


# --- parameter normalisation -----------------------------------------------------------------


def _vec3(value: Any, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise EditError(f"{name} must be three numbers, got {value!r}") from None
    if len(values) != 3 or not all(np.isfinite(values)):
        raise EditError(f"{name} must be three finite numbers, got {value!r}")
    return values  # type: ignore[return-value]


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise in __post_init__


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# --- edits ---------------------------------------------------------------------------------


def _register(cls: type["Edit"]) -> type["Edit"]:
    EDITS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Edit:
    """Base class of the tumour edits: JSON parameters, a record and a pure ``apply``."""

    name: ClassVar[str] = "edit"
    #: Fields that are not part of the provenance record (e.g. local file paths).
    _unrecorded: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, Any]:
        """The edit's parameters as plain JSON values (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in self._unrecorded}

    def to_record(self) -> dict[str, Any]:
        """Provenance record ``{"name", "params", "schema_version"}`` (JSON-serialisable)."""
        return {"name": self.name, "params": self.params(), "schema_version": SCHEMA_VERSION}

    def apply(self, labelmap: LabelMap) -> LabelMap:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, labelmap: LabelMap) -> LabelMap:
        return self.apply(labelmap)


@_register
@dataclass(frozen=True)
class Translate(Edit):
    """Move the tumour by a RAS offset in mm.

    The offset is rounded to whole voxels of the grid, so the voxel count of every
    tumour class is kept exactly when the moved tumour stays in brain tissue
    (oedema pushed past the brain boundary is clipped and loses voxels).

    Attributes:
        offset_ras_mm: (R, A, S) displacement in millimetres.
    """

    name: ClassVar[str] = "translate"
    offset_ras_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        _set(self, "offset_ras_mm", _vec3(self.offset_ras_mm, "offset_ras_mm"))

    def voxel_offset(self, grid: Grid) -> np.ndarray:
        """The offset as whole voxels in numpy ``(k, j, i)`` order."""
        ijk = np.linalg.solve(grid.index_to_lps_matrix, ras_to_lps(self.offset_ras_mm))
        return np.round(ijk[::-1]).astype(int)

    def apply(self, labelmap: LabelMap) -> LabelMap:
        labels = labelmap.array
        tumour = _tumour_only(labels)
        if not tumour.any():
            raise EditError("the label map has no tumour to edit")
        offset = self.voxel_offset(labelmap.grid)
        # Slicing, not np.roll: a tumour pushed past the array edge must vanish, not wrap around.
        moved = np.zeros_like(tumour)
        if np.all(np.abs(offset) < labels.shape):
            src = tuple(slice(max(-o, 0), n - max(o, 0)) for n, o in zip(labels.shape, offset))
            dst = tuple(slice(max(o, 0), n - max(-o, 0)) for n, o in zip(labels.shape, offset))
            moved[dst] = tumour[src]
        lost = _core_count(tumour) - _core_count(moved)
        anatomy = healthy_anatomy(labels, labelmap.grid.spacing)
        out = composite(anatomy, moved, labels > Label.BACKGROUND, core_lost_voxels=lost)
        return labelmap.with_array(out, self.to_record())


@_register
@dataclass(frozen=True)
class Rotate(Edit):
    """Rotate the tumour about its centre, in physical space.

    Attributes:
        angles_deg: rotation angles about the RAS x, y and z axes (degrees,
            right-handed), applied in that order.
    """

    name: ClassVar[str] = "rotate"
    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        _set(self, "angles_deg", _vec3(self.angles_deg, "angles_deg"))

    def apply(self, labelmap: LabelMap) -> LabelMap:
        centre = tumour_centre(labelmap)
        matrix = _ras_matrix_to_lps(rotation_ras(self.angles_deg))
        return labelmap.with_array(_move_tumour(labelmap, matrix, centre), self.to_record())


@_register
@dataclass(frozen=True)
class Scale(Edit):
    """Scale the tumour about its centre (volume scales by the product of the factors).

    Attributes:
        factors: scale factors along the RAS x, y, z axes (three equal values for
            an isotropic scaling).
    """

    name: ClassVar[str] = "scale"
    factors: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        factors = _vec3(self.factors, "factors")
        if not all(0.05 <= f <= 20.0 for f in factors):
            raise EditError(f"scale factors must lie in [0.05, 20], got {factors}")
        _set(self, "factors", factors)

    def apply(self, labelmap: LabelMap) -> LabelMap:
        centre = tumour_centre(labelmap)
        matrix = _ras_matrix_to_lps(np.diag(self.factors))
        return labelmap.with_array(_move_tumour(labelmap, matrix, centre), self.to_record())


@_register
@dataclass(frozen=True)
class Flip(Edit):
    """Mirror the tumour across a plane perpendicular to one RAS axis.

    The plane goes through the tumour centre (``about="tumour"``: the shape is
    mirrored in place) or through the centre of the brain's bounding box
    (``about="brain"``: the tumour moves to the other hemisphere for ``"LR"``).
    The plane is snapped to the nearest half voxel so that, on an axis-aligned
    grid, the flip is an exact voxel permutation and keeps every class count.

    Attributes:
        axis: ``"LR"``, ``"AP"`` or ``"SI"``.
        about: ``"tumour"`` or ``"brain"``.
    """

    name: ClassVar[str] = "flip"
    axis: str = "LR"
    about: str = "tumour"

    def __post_init__(self) -> None:
        if self.axis not in _AXES:
            raise EditError(f"flip axis must be one of {sorted(_AXES)}, got {self.axis!r}")
        if self.about not in ("tumour", "brain"):
            raise EditError(f"flip about must be 'tumour' or 'brain', got {self.about!r}")

    def apply(self, labelmap: LabelMap) -> LabelMap:
        grid = labelmap.grid
        centre = tumour_centre(labelmap) if self.about == "tumour" else _brain_centre(labelmap)
        centre = grid.index_to_lps(np.round(2.0 * grid.lps_to_index(centre)) / 2.0)
        mirror = np.ones(3)
        mirror[_AXES[self.axis]] = -1.0
        matrix = _ras_matrix_to_lps(np.diag(mirror))
        return labelmap.with_array(_move_tumour(labelmap, matrix, centre), self.to_record())


def load_label_map(path: str | os.PathLike[str]) -> LabelMap:
    """Read a MedSynth label map (see :func:`MedSynthLib.schema.labelmap.read_label_map`)."""
    from ..schema.labelmap import read_label_map

    return read_label_map(path)


@_register
@dataclass(frozen=True)
class InsertTumour(Edit):
    """Insert the tumour of another label map into this brain.

    The source tumour is resampled into the target grid by physical coordinates.
    Without ``center_ras_mm`` its centre is placed at the same relative position
    inside the target brain's bounding box as it had inside the source brain's
    (so a tumour of an SRI24-space BraTS case lands at the matching place of an
    MNI template); otherwise at the given RAS point.  The target's own tumour is
    removed first (healthy refill) unless ``keep_existing``.

    Attributes:
        source_tumour_path: label map file to read the source from when
            :meth:`apply` is not given one.  Not recorded (paths must not leak
            into provenance).
        center_ras_mm: RAS point for the tumour centre, or ``None`` for the
            relative placement.
        keep_existing: keep the target's tumour (the new one is drawn over it).
        source: identifier of the source recorded in the provenance.
    """

    name: ClassVar[str] = "insert_tumour"
    _unrecorded: ClassVar[tuple[str, ...]] = ("source_tumour_path",)
    source_tumour_path: str | None = None
    center_ras_mm: tuple[float, float, float] | None = None
    keep_existing: bool = False
    source: str = "external"

    def __post_init__(self) -> None:
        if self.center_ras_mm is not None:
            _set(self, "center_ras_mm", _vec3(self.center_ras_mm, "center_ras_mm"))
        if self.source_tumour_path is not None:
            _set(self, "source_tumour_path", os.fspath(self.source_tumour_path))
        _set(self, "keep_existing", bool(self.keep_existing))
        _set(self, "source", str(self.source))

    def placement_lps(self, target: LabelMap, source: LabelMap) -> np.ndarray:
        """Where the source tumour's centre goes in the target, in LPS mm."""
        if self.center_ras_mm is not None:
            return ras_to_lps(self.center_ras_mm)
        s_min, s_max = _brain_box_lps(source)
        t_min, t_max = _brain_box_lps(target)
        extent = np.where(s_max > s_min, s_max - s_min, 1.0)
        relative = (tumour_centre(source) - s_min) / extent
        return t_min + relative * (t_max - t_min)

    def apply(self, labelmap: LabelMap, source: LabelMap | None = None) -> LabelMap:  # type: ignore[override]
        """Insert ``source``'s tumour (read from ``source_tumour_path`` when ``None``)."""
        if source is None:
            if self.source_tumour_path is None:
                raise EditError(f"insert_tumour needs the source label map {self.source!r}: "
                                "pass it to apply() or give source_tumour_path")
            source = load_label_map(self.source_tumour_path)
        source_centre = tumour_centre(source)  # raises when the source has no tumour
        shift = self.placement_lps(labelmap, source) - source_centre
        forward = _index_affine(source.grid, labelmap.grid, np.eye(3), shift)
        tumour, lost = resample_tumour(source.array, forward, labelmap.array.shape)
        if not tumour.any() and not lost:
            raise EditError("the source tumour is smaller than a voxel of the target grid")
        labels = labelmap.array
        base = labels if self.keep_existing else healthy_anatomy(labels, labelmap.grid.spacing)
        try:
            out = composite(base, tumour, labels > Label.BACKGROUND, core_lost_voxels=lost)
        except EditError as exc:
            raise EditError(f"the source tumour cannot fit in the target brain ({exc})") from None
        if not (out >= Label.NCR).any():
            raise EditError("the source tumour cannot fit in the target brain (no tumour voxel left)")
        return labelmap.with_array(out, self.to_record())


@_register
@dataclass(frozen=True)
class ParametricTumour(Edit):
    """Draw a plausible glioblastoma-like tumour: necrotic core, enhancing rim, oedema.

    The shape is an ellipsoid (radii along the RAS axes, in mm) whose normalised
    distance is perturbed by a smooth random field (Gaussian-filtered noise from
    ``numpy.random.default_rng(seed)``, amplitude set by ``irregularity``), so
    the boundary is irregular but identical for the same parameters.  The noise
    lives in the tumour's own normalised coordinates, so the shape does not
    depend on the grid.  NCR is the part deeper than ``rim_mm`` inside the
    tumour (when ``necrosis``), ET the rim, and ED a perturbed shell reaching
    about ``oedema_mm`` beyond it, on WM/GM only.  The core is always enclosed
    by the rim, and the rim by oedema wherever the neighbour is WM/GM.

    Attributes:
        center_ras_mm: tumour centre (RAS mm); must be inside the brain.
        radii_mm: ellipsoid radii along RAS x, y, z (mm).
        rim_mm: thickness of the enhancing rim (mm).
        necrosis: draw a necrotic core (otherwise ET fills the tumour).
        oedema_mm: oedema reach beyond the tumour (mm, 0 for none).
        irregularity: boundary perturbation, 0 (ellipsoid) to 1.
        seed: seed of the noise field.
        keep_existing: keep the map's current tumour (otherwise refilled with anatomy).
    """

    name: ClassVar[str] = "parametric_tumour"
    center_ras_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radii_mm: tuple[float, float, float] = (15.0, 15.0, 15.0)
    rim_mm: float = 2.0
    necrosis: bool = True
    oedema_mm: float = 10.0
    irregularity: float = 0.3
    seed: int = 0
    keep_existing: bool = False

    #: Lattice step and smoothing of the noise field, in units of the radii.
    _NOISE_STEP: ClassVar[float] = 0.1
    _NOISE_SIGMA: ClassVar[float] = 0.3
    _NOISE_CLIP: ClassVar[float] = 1.5

    def __post_init__(self) -> None:
        _set(self, "center_ras_mm", _vec3(self.center_ras_mm, "center_ras_mm"))
        radii = _vec3(self.radii_mm, "radii_mm")
        if min(radii) <= 0:
            raise EditError(f"radii_mm must be positive, got {radii}")
        _set(self, "radii_mm", radii)
        for field_name in ("rim_mm", "oedema_mm", "irregularity"):
            value = float(getattr(self, field_name))
            if not np.isfinite(value) or value < 0:
                raise EditError(f"{field_name} must be a non-negative number, got {value}")
            _set(self, field_name, value)
        if self.irregularity > 1.0:
            raise EditError(f"irregularity must lie in [0, 1], got {self.irregularity}")
        _set(self, "necrosis", bool(self.necrosis))
        _set(self, "keep_existing", bool(self.keep_existing))
        _set(self, "seed", int(self.seed))

    def _noise_fields(self, extent: float) -> tuple[np.ndarray, float, float]:
        """Two smooth unit-variance fields on a lattice covering [-extent, extent]^3 (normalised units)."""
        step = max(self._NOISE_STEP, 2.0 * extent / 64.0)  # cap the lattice at ~65^3 points
        n = int(np.ceil(2.0 * extent / step)) + 1
        rng = np.random.default_rng(self.seed)
        fields = []
        for _ in range(2):  # tumour boundary, oedema boundary
            field = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), self._NOISE_SIGMA / step, mode="wrap")
            field /= max(float(field.std()), 1e-12)
            fields.append(np.clip(field, -self._NOISE_CLIP, self._NOISE_CLIP))
        return np.stack(fields), step, extent

    def apply(self, labelmap: LabelMap) -> LabelMap:
        grid, labels = labelmap.grid, labelmap.array
        centre_lps = ras_to_lps(self.center_ras_mm)
        centre_kji = grid.lps_to_index(centre_lps)[::-1]
        voxel = np.round(centre_kji).astype(int)
        if np.any(voxel < 0) or np.any(voxel >= labels.shape) or labels[tuple(voxel)] == Label.BACKGROUND:
            raise EditError(f"parametric tumour centre {tuple(round(v, 1) for v in self.center_ras_mm)} "
                            "(RAS mm) is outside the brain")
        radii = np.asarray(self.radii_mm)
        oedema = self.oedema_mm / float(radii.mean())
        amplitude = 0.5 * self.irregularity
        reach = (1.0 + oedema) * (1.0 + amplitude * self._NOISE_CLIP)  # farthest normalised distance
        # Box: the RAS-aligned cuboid of the reach, mapped to indices, plus a margin.
        half = reach * radii + 2.0 * max(grid.spacing)
        corners_ras = np.array([self.center_ras_mm + half * np.array([a, b, c])
                                for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
        corners_kji = grid.lps_to_index(ras_to_lps(corners_ras.T).T)[:, ::-1]
        lo = np.floor(corners_kji.min(axis=0)).astype(int) - 1
        hi = np.ceil(corners_kji.max(axis=0)).astype(int) + 2

        # Normalised RAS coordinates u of every box voxel (k, j, i broadcast, no full index grid).
        kk, jj, ii = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        m = grid.index_to_lps_matrix
        lps = [grid.origin[r] + m[r, 0] * ii + m[r, 1] * jj + m[r, 2] * kk for r in range(3)]
        ras = [-lps[0], -lps[1], lps[2]]
        u = [(ras[r] - self.center_ras_mm[r]) / radii[r] for r in range(3)]
        u = [np.broadcast_to(c, tuple(hi - lo)) for c in u]
        distance = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)

        fields, step, extent = self._noise_fields(reach + 0.5)
        coords = np.stack([(c + extent) / step for c in u])
        noise = [ndimage.map_coordinates(f, coords, order=1, mode="nearest") for f in fields]
        # Multiplicative perturbation of the radius: the centre is always inside.
        tumour = distance / (1.0 + amplitude * noise[0]) <= 1.0
        tumour = _component_at(tumour, np.round(centre_kji).astype(int) - lo)

        brain_box = _crop(labels > Label.BACKGROUND, lo, hi, fill=False)
        n_tumour = int(np.count_nonzero(tumour))
        if n_tumour == 0:
            raise EditError("parametric tumour is smaller than a voxel")
        outside = int(np.count_nonzero(tumour & ~brain_box))
        if outside / n_tumour > MAX_OUTSIDE_FRACTION:
            raise EditError(f"parametric tumour core does not fit in the brain "
                            f"({100.0 * outside / n_tumour:.1f}% of it would be outside)")
        tumour &= brain_box

        sampling = np.asarray(grid.spacing)[::-1]
        if self.necrosis and self.rim_mm > 0:
            depth = ndimage.distance_transform_edt(tumour, sampling=sampling)
            # Erosion with the full 3x3x3 element guarantees every NCR neighbour is tumour.
            ncr = tumour & (depth > self.rim_mm) & ndimage.binary_erosion(tumour, _FULL_3X3)
        elif self.necrosis:
            ncr = tumour & ndimage.binary_erosion(tumour, _FULL_3X3)
        else:
            ncr = np.zeros_like(tumour)

        base = labels if self.keep_existing else healthy_anatomy(labels, grid.spacing)
        base_box = _crop(base, lo, hi)
        if self.oedema_mm > 0:
            oedema_region = distance / (1.0 + amplitude * noise[1]) <= 1.0 + oedema
            # At least a one-voxel shell so the rim is always wrapped in oedema.
            oedema_region |= ndimage.binary_dilation(tumour, _FULL_3X3)
            ed = oedema_region & ~tumour & ((base_box == Label.GM) | (base_box == Label.WM))
            # Drop oedema islands that the perturbation cut off from the tumour.
            components, _ = ndimage.label(ed | tumour, _FULL_3X3)
            keep = np.unique(components[tumour])
            ed &= np.isin(components, keep[keep > 0])
        else:
            ed = np.zeros_like(tumour)

        box_labels = np.zeros(tumour.shape, dtype=np.uint8)
        box_labels[ed] = Label.ED
        box_labels[tumour] = Label.ET
        box_labels[ncr] = Label.NCR
        full = np.zeros(labels.shape, dtype=np.uint8)
        _paste(full, box_labels, lo)
        out = composite(base, full, labels > Label.BACKGROUND)
        return labelmap.with_array(out, self.to_record())


def _component_at(mask: np.ndarray, seed_kji: np.ndarray) -> np.ndarray:
    """The connected component of ``mask`` holding ``seed_kji`` (else the largest one)."""
    components, count = ndimage.label(mask, _FULL_3X3)
    if count <= 1:
        return mask
    inside = np.all(seed_kji >= 0) and np.all(seed_kji < mask.shape)
    chosen = components[tuple(seed_kji)] if inside else 0
    if chosen == 0:
        chosen = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    return components == chosen


# --- records and replay ----------------------------------------------------------------------


def edit_from_record(record: Mapping[str, Any]) -> Edit:
    """Rebuild an edit from its :meth:`Edit.to_record` record.

    Raises:
        EditError: unknown edit name, another schema version, or bad parameters.
    """
    try:
        name, params = record["name"], dict(record.get("params", {}))
    except (KeyError, TypeError, AttributeError):
        raise EditError(f"not an edit record: {record!r}") from None
    if name not in EDITS:
        raise EditError(f"unknown edit {name!r} (known: {', '.join(sorted(EDITS))})")
    version = record.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise EditError(f"edit record has label schema version {version}, this MedSynth uses {SCHEMA_VERSION}")
    cls = EDITS[name]
    known = {f.name for f in dataclasses.fields(cls)} - set(cls._unrecorded)
    unknown = sorted(set(params) - known)
    if unknown:
        raise EditError(f"edit {name!r} has no parameter(s) {', '.join(unknown)}")
    return cls(**params)


def replay(labelmap: LabelMap, records: Sequence[Mapping[str, Any]],
           sources: Mapping[str, LabelMap] | None = None) -> LabelMap:
    """Apply edit records in order.

    Args:
        labelmap: the label map to start from.
        records: edit records (e.g. the tail of an edited map's ``history``).
        sources: source label maps of :class:`InsertTumour` records, keyed by
            their recorded ``source`` identifier.

    Returns:
        The edited label map (its history extended by every record).
    """
    for record in records:
        edit = edit_from_record(record)
        if isinstance(edit, InsertTumour):
            source = (sources or {}).get(edit.source)
            labelmap = edit.apply(labelmap, source)
        else:
            labelmap = edit.apply(labelmap)
    return labelmap


# --- random sampler ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomTumourEdit:
    """Draw a random, valid tumour edit (TorchIO style); the result replays exactly.

    With probability ``p_parametric`` (or always when the map has no tumour) a
    :class:`ParametricTumour` is drawn at a random white-matter voxel;
    otherwise an optional :class:`Flip` (LR), a :class:`Rotate`, an isotropic
    :class:`Scale` and a :class:`Translate`.  A draw whose edits raise
    :class:`EditError` is discarded and drawn again, up to ``max_tries`` times;
    the sequence of draws is fixed by the seed.

    Attributes:
        translate_mm: largest offset along each RAS axis (mm).
        rotate_deg: largest rotation about each RAS axis (degrees).
        scale_range: range of the isotropic scale factor.
        p_flip: probability of an LR flip.
        flip_about: ``"tumour"`` or ``"brain"`` (other hemisphere).
        p_parametric: probability of a new parametric tumour instead of a transform.
        radius_fraction: parametric radii as a fraction of the brain's half-extent.
        max_tries: draws before giving up.
    """

    translate_mm: float = 20.0
    rotate_deg: float = 30.0
    scale_range: tuple[float, float] = (0.7, 1.3)
    p_flip: float = 0.5
    flip_about: str = "tumour"
    p_parametric: float = 0.25
    radius_fraction: tuple[float, float] = (0.08, 0.2)
    max_tries: int = 10

    def draw(self, labelmap: LabelMap, rng: np.random.Generator) -> list[Edit]:
        """One draw of edits (not yet checked); ``rng`` advances."""
        has_tumour = bool((labelmap.array >= Label.NCR).any())
        if not has_tumour or rng.random() < self.p_parametric:
            return [self._draw_parametric(labelmap, rng)]
        edits: list[Edit] = []
        if rng.random() < self.p_flip:
            edits.append(Flip("LR", self.flip_about))
        angles = rng.uniform(-self.rotate_deg, self.rotate_deg, 3)
        edits.append(Rotate(tuple(float(a) for a in angles)))  # type: ignore[arg-type]
        factor = float(rng.uniform(*self.scale_range))
        edits.append(Scale((factor, factor, factor)))
        offset = rng.uniform(-self.translate_mm, self.translate_mm, 3)
        edits.append(Translate(tuple(float(v) for v in offset)))  # type: ignore[arg-type]
        return edits

    def _draw_parametric(self, labelmap: LabelMap, rng: np.random.Generator) -> ParametricTumour:
        labels = labelmap.array
        candidates = np.flatnonzero(labels == Label.WM)
        if candidates.size == 0:
            candidates = np.flatnonzero(labels > Label.BACKGROUND)
        if candidates.size == 0:
            raise EditError("the label map has no brain to put a tumour in")
        kji = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], labels.shape), float)
        centre = lps_to_ras(labelmap.grid.index_to_lps(kji[::-1]))
        b_min, b_max = _brain_box_lps(labelmap)
        half_extent = float(np.mean(b_max - b_min)) / 2.0
        base = half_extent * rng.uniform(*self.radius_fraction)
        radii = base * rng.uniform(0.8, 1.2, 3)
        return ParametricTumour(
            center_ras_mm=tuple(float(v) for v in centre),  # type: ignore[arg-type]
            radii_mm=tuple(float(v) for v in radii),  # type: ignore[arg-type]
            rim_mm=float(rng.uniform(1.5, 3.0)),
            necrosis=bool(rng.random() < 0.8),
            oedema_mm=float(base * rng.uniform(0.3, 1.0)),
            irregularity=float(rng.uniform(0.1, 0.5)),
            seed=int(rng.integers(2**31 - 1)),
        )

    def _sample(self, labelmap: LabelMap, seed: int) -> tuple[list[Edit], LabelMap]:
        rng = np.random.default_rng(seed)
        last: EditError | None = None
        for _ in range(self.max_tries):
            edits = self.draw(labelmap, rng)
            try:
                result = labelmap
                for edit in edits:
                    result = edit.apply(result)
            except EditError as exc:
                last = exc
                continue
            return edits, result
        raise EditError(f"no valid random tumour edit in {self.max_tries} tries (last: {last})")

    def sample(self, labelmap: LabelMap, seed: int) -> list[Edit]:
        """The deterministic edits drawn for ``seed`` (validated on ``labelmap``)."""
        return self._sample(labelmap, seed)[0]

    def apply(self, labelmap: LabelMap, seed: int) -> LabelMap:
        """Apply a random edit; the new history records replay it bit-identically."""
        return self._sample(labelmap, seed)[1]

    def __call__(self, labelmap: LabelMap, seed: int) -> LabelMap:
        return self.apply(labelmap, seed)


__all__ = [
    "EDITS", "MAX_OUTSIDE_FRACTION", "Edit", "Translate", "Rotate", "Scale", "Flip", "InsertTumour",
    "ParametricTumour", "RandomTumourEdit", "healthy_anatomy", "composite", "resample_tumour",
    "tumour_centre", "load_label_map", "edit_from_record", "replay",
]
