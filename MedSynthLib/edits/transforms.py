"""Move, rotate, scale and flip a tumour: one resampling of the tumour sub-labels.

:func:`resample_tumour` moves the tumour of a label array under a voxel affine (one-hot
linear interpolation, or an exact voxel permutation for flips); each edit builds its
physical map about the tumour centre and composites the result over the healthy anatomy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
from scipy import ndimage

from ..schema.errors import EditError
from ..schema.grid import Grid, LabelMap, lps_to_ras, ras_to_lps
from ..schema.labels import Label, brain_mask, core_mask, tumour_mask
from .base import (Edit, clipped_counts, clipped_tumour_voxels, composite, core_count, healthy_anatomy,
                   refuse_core_outside, register, set_field, tumour_only, tumour_refill, vec3)
from .geometry import (AXES, bounds, brain_centre, check_length, crop, index_affine, paste, ras_matrix_to_lps,
                       rotation_ras, tumour_centre)

#: Channel order for the one-hot resampling: on a tie argmax takes the first, so
#: inner classes win ties and the nesting NCR < ET < ED is kept at boundaries.
_CHANNEL_ORDER = (int(Label.NCR), int(Label.ET), int(Label.ED))


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
    box = bounds(tumour_mask(labels))
    if box is None:
        return result, 0
    lo_in, hi_in = box[0] - 1, box[1] + 1
    sub = tumour_only(crop(labels, lo_in, hi_in))
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
    paste(result, moved, lo_out)
    return result, core_lost


def _core_lost_estimate(sub: np.ndarray, lo_in: np.ndarray, forward: np.ndarray, out_shape: tuple[int, ...]) -> int:
    """Core voxels a map pushes off the output array: input core voxel centres landing
    outside it, times the volume change of the map (exact for translations and flips)."""
    core = np.argwhere(core_mask(sub))
    if core.size == 0:
        return 0
    mapped = (core + lo_in) @ forward[:3, :3].T + forward[:3, 3]
    off = np.any((mapped < -0.5) | (mapped >= np.asarray(out_shape) - 0.5), axis=1)
    n_off = int(np.count_nonzero(off))
    return max(int(round(n_off * abs(np.linalg.det(forward[:3, :3])))), 1) if n_off else 0


def _move_tumour(labelmap: LabelMap, matrix_lps: np.ndarray, centre_lps: np.ndarray,
                 clipped: dict[str, int] | None = None) -> np.ndarray:
    """Apply ``x -> R (x - c) + c`` (LPS) to the tumour and composite it over the healthy anatomy.

    Args:
        clipped: filled, when given, with the moved tumour's voxels per class that land outside the brain (what
            the compositing leaves out); resampling's own gains and losses are not counted.
    """
    matrix_lps = np.asarray(matrix_lps, float)
    shift = centre_lps - matrix_lps @ centre_lps
    forward = index_affine(labelmap.grid, labelmap.grid, matrix_lps, shift)
    tumour, lost = resample_tumour(labelmap.array, forward, labelmap.array.shape)
    if not tumour.any():
        raise EditError("tumour edit leaves no tumour voxel (the tumour became smaller than a voxel)")
    brain = brain_mask(labelmap.array)
    refuse_core_outside(tumour, brain, core_lost_voxels=lost)  # before the costly refill
    if clipped is not None:
        clipped.update(clipped_tumour_voxels(tumour, np.where(brain, tumour, 0)))
    anatomy = healthy_anatomy(labelmap.array, labelmap.grid.spacing)
    return composite(anatomy, tumour, brain, core_lost_voxels=lost)


@register
@dataclass(frozen=True)
class Translate(Edit):
    """Move the tumour by a RAS offset in mm.

    The offset is rounded to whole voxels of the grid, so the voxel count of every
    tumour class is kept exactly when the moved tumour stays in brain tissue
    (oedema pushed past the brain boundary is clipped and loses voxels).

    Attributes:
        offset_ras_mm: (R, A, S) displacement in millimetres, as requested.
        applied_offset_ras_mm: the whole-voxel displacement actually applied (RAS mm);
            filled in when the edit is applied, for the record only (replay rounds
            ``offset_ras_mm`` again, on the same grid to the same voxels).
        clipped_tumour_voxels: the tumour voxels per class the move pushed out of the
            brain (clipped); filled in when applied, None when none (``Edit.records_clipping``).
    """

    name: ClassVar[str] = "translate"
    _outcomes: ClassVar[tuple[str, ...]] = ("applied_offset_ras_mm", "clipped_tumour_voxels")
    records_clipping: ClassVar[bool] = True
    offset_ras_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    applied_offset_ras_mm: tuple[float, float, float] | None = None
    clipped_tumour_voxels: dict[str, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        set_field(self, "offset_ras_mm", vec3(self.offset_ras_mm, "offset_ras_mm"))
        if self.applied_offset_ras_mm is not None:
            set_field(self, "applied_offset_ras_mm", vec3(self.applied_offset_ras_mm, "applied_offset_ras_mm"))
        set_field(self, "clipped_tumour_voxels", clipped_counts(self.clipped_tumour_voxels))

    def __call__(self, labelmap: LabelMap, *args, **kwargs) -> LabelMap:
        """As :meth:`Edit.__call__`, the record also holding the offset applied on this grid."""
        self.check(labelmap.grid)  # before rounding: a huge offset is refused, not overflowed
        moved = self.applied_offset(labelmap.grid)
        recorded = self.applied_offset_ras_mm
        # A replayed record says what it moved: another whole-voxel offset means another grid (or an edited
        # record), and the replay would silently be another map.  A micrometre covers the record's rounding and a
        # grid equal up to float noise (another voxel count differs by a voxel's size).
        if recorded is not None and max(abs(a - b) for a, b in zip(moved, recorded)) > 1e-3:
            raise EditError(f"the record's applied_offset_ras_mm {list(recorded)} mm is not the "
                            f"{list(moved)} mm that offset_ras_mm {list(self.offset_ras_mm)} moves on this grid "
                            f"(spacing {list(labelmap.grid.spacing)} mm): the record was made on another grid "
                            "or edited")
        applied = dataclasses.replace(self, applied_offset_ras_mm=moved)
        return Edit.__call__(applied, labelmap, *args, **kwargs)

    def applied_offset(self, grid: Grid) -> tuple[float, float, float]:
        """The whole-voxel offset :meth:`apply` moves by, in RAS mm (rounded to 1e-6 mm for the record)."""
        lps = grid.index_to_lps_matrix @ self.voxel_offset(grid)[::-1].astype(float)
        return tuple(round(float(v), 6) + 0.0 for v in lps_to_ras(lps))  # type: ignore[return-value]

    def check(self, grid: Grid) -> None:
        # A move longer than the grid's diagonal takes every voxel off the grid: refused, never recorded.
        offset = np.asarray(self.offset_ras_mm)
        longest = float(np.abs(offset).max())
        length = longest * float(np.linalg.norm(offset / longest)) if longest > 0 else 0.0  # no overflow at 1e300
        check_length(length, "translation", grid)

    def voxel_offset(self, grid: Grid) -> np.ndarray:
        """The offset as whole voxels in numpy ``(k, j, i)`` order."""
        ijk = np.linalg.solve(grid.index_to_lps_matrix, ras_to_lps(self.offset_ras_mm))
        return np.round(ijk[::-1]).astype(int)

    def apply(self, labelmap: LabelMap) -> np.ndarray:
        return self._moved(labelmap)[0]

    def apply_and_clipped(self, labelmap: LabelMap) -> tuple[np.ndarray, dict[str, int]]:
        out, box = self._moved(labelmap)
        return out, clipped_tumour_voxels(labelmap.array[box], out[box])  # nothing changes outside the box

    def _moved(self, labelmap: LabelMap) -> tuple[np.ndarray, tuple[slice, ...]]:
        """The edited array and the box of the old and the new place (the only voxels that change)."""
        labels = labelmap.array
        found = bounds(tumour_mask(labels))
        if found is None:
            raise EditError("the label map has no tumour to edit")
        offset = self.voxel_offset(labelmap.grid)
        shape = np.asarray(labels.shape)
        # Only the box of the old and the new place changes: the work is done there (a drag in the preview
        # moves the tumour many times; the whole volume is 20-60 times that box).  Inside it the result is the
        # whole-volume one: the tumour moved by slicing (not np.roll: a tumour pushed past the array edge must
        # vanish, not wrap around; the box holds every voxel that lands inside the array), the anatomy refilled
        # and the tumour composited.
        lo_old, hi_old = found
        lo_new, hi_new = np.clip(lo_old + offset, 0, shape), np.clip(hi_old + offset, 0, shape)
        lands = bool(np.all(hi_new > lo_new))
        lo, hi = (np.minimum(lo_old, lo_new), np.maximum(hi_old, hi_new)) if lands else (lo_old, hi_old)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        window = labels[box]
        tumour = tumour_only(window)
        moved = np.zeros_like(tumour)
        if np.all(np.abs(offset) < window.shape):
            src = tuple(slice(max(-o, 0), n - max(o, 0)) for n, o in zip(window.shape, offset))
            dst = tuple(slice(max(o, 0), n - max(-o, 0)) for n, o in zip(window.shape, offset))
            moved[dst] = tumour[src]
        lost = core_count(tumour) - core_count(moved)
        brain = brain_mask(window)
        refuse_core_outside(moved, brain, core_lost_voxels=lost)  # before the costly refill
        where, fill = tumour_refill(labels, labelmap.grid.spacing, tumour_box=found)
        anatomy = window.astype(np.uint8, copy=True)
        anatomy[tuple(w - int(a) for w, a in zip(where, lo))] = fill  # every tumour voxel lies in the box
        out = labels.astype(np.uint8, copy=True)
        out[box] = composite(anatomy, moved, brain, core_lost_voxels=lost)
        return out, box


@register
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
        set_field(self, "angles_deg", vec3(self.angles_deg, "angles_deg"))

    def apply(self, labelmap: LabelMap) -> np.ndarray:
        centre = tumour_centre(labelmap)
        matrix = ras_matrix_to_lps(rotation_ras(self.angles_deg))
        return _move_tumour(labelmap, matrix, centre)


@register
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
        factors = vec3(self.factors, "factors")
        if not all(0.05 <= f <= 20.0 for f in factors):
            raise EditError(f"scale factors must lie in [0.05, 20], got {factors}")
        set_field(self, "factors", factors)

    def apply(self, labelmap: LabelMap) -> np.ndarray:
        centre = tumour_centre(labelmap)
        matrix = ras_matrix_to_lps(np.diag(self.factors))
        return _move_tumour(labelmap, matrix, centre)


@register
@dataclass(frozen=True)
class Flip(Edit):
    """Mirror the tumour across a plane perpendicular to one RAS axis.

    The plane goes through the tumour centre (``about="tumour"``: the shape is
    mirrored in place) or through the centre of the brain's bounding box
    (``about="brain"``: the tumour moves to the other hemisphere for ``"LR"``).
    The plane is snapped to the nearest half voxel so that, on an axis-aligned
    grid, the flip is an exact voxel permutation and keeps every class count but
    what lands outside the brain (``clipped_tumour_voxels``; on an oblique grid the
    tumour is resampled, and the counts change by that too, which is not clipping).

    Attributes:
        axis: ``"LR"``, ``"AP"`` or ``"SI"``.
        about: ``"tumour"`` or ``"brain"``.
        clipped_tumour_voxels: the tumour voxels per class the flip put outside the
            brain (clipped); filled in when applied, None when none (``Edit.records_clipping``).
    """

    name: ClassVar[str] = "flip"
    _outcomes: ClassVar[tuple[str, ...]] = ("clipped_tumour_voxels",)
    records_clipping: ClassVar[bool] = True
    axis: str = "LR"
    about: str = "tumour"
    clipped_tumour_voxels: dict[str, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        set_field(self, "clipped_tumour_voxels", clipped_counts(self.clipped_tumour_voxels))
        if not isinstance(self.axis, str) or self.axis not in AXES:
            raise EditError(f"flip axis must be one of {sorted(AXES)}, got {self.axis!r}")
        if not isinstance(self.about, str) or self.about not in ("tumour", "brain"):
            raise EditError(f"flip about must be 'tumour' or 'brain', got {self.about!r}")

    def apply(self, labelmap: LabelMap) -> np.ndarray:
        return self.apply_and_clipped(labelmap)[0]

    def apply_and_clipped(self, labelmap: LabelMap) -> tuple[np.ndarray, dict[str, int]]:
        """The flipped map, and the flipped tumour's voxels that land outside the brain (the mirror plane keeps
        the tumour on the grid: it goes through the tumour, or the brain's box, which holds it)."""
        grid = labelmap.grid
        if not tumour_mask(labelmap.array).any():  # about="brain" would otherwise report a vanished tumour
            raise EditError("the label map has no tumour to edit")
        centre = tumour_centre(labelmap) if self.about == "tumour" else brain_centre(labelmap)
        centre = grid.index_to_lps(np.round(2.0 * grid.lps_to_index(centre)) / 2.0)
        mirror = np.ones(3)
        mirror[AXES[self.axis]] = -1.0
        matrix = ras_matrix_to_lps(np.diag(mirror))
        clipped: dict[str, int] = {}
        return _move_tumour(labelmap, matrix, centre, clipped), clipped


