"""A new, parametric tumour: necrotic core, enhancing rim and oedema drawn from a few numbers.

Everything is computed inside one box: the reach of the tumour and its oedema, clipped to the
brain's bounding box (what lies outside the brain is clipped anyway).  Memory therefore never
exceeds a few arrays of the brain's box, whatever the radii; radii and margins longer than the
grid's diagonal are refused before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
from scipy import ndimage

from ..schema.errors import EditError
from ..schema.grid import Grid, LabelMap, ras_to_lps
from ..schema.labels import Label, brain_mask
from .base import (FULL_3X3, MAX_OUTSIDE_FRACTION, Edit, composite, finite, flag, healthy_anatomy, register, set_field,
                   vec3)
from .geometry import bounds, check_length, check_point, crop, paste

#: Most lattice points of the coarse count of a tumour core reaching past the brain's box.
_COARSE_POINTS = 2_000_000


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in [0, 2**63), or :class:`EditError`."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        number = float(value)
        seed = int(value)
    except (TypeError, ValueError, OverflowError):
        raise EditError(f"{name} must be a non-negative integer, got {value!r}") from None
    if seed != number or not 0 <= seed < 2**63:
        raise EditError(f"{name} must be an integer in [0, 2**63), got {value!r}")
    return seed


@register
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
        centre_ras_mm: tumour centre (RAS mm); must be inside the brain.
        radii_mm: ellipsoid radii along RAS x, y, z (mm).
        rim_mm: thickness of the enhancing rim (mm).
        necrosis: draw a necrotic core (otherwise ET fills the tumour).
        oedema_mm: oedema reach beyond the tumour (mm, 0 for none).
        irregularity: boundary perturbation, 0 (ellipsoid) to 1.
        seed: seed of the noise field.
        keep_existing: keep the map's current tumour (otherwise refilled with anatomy).
    """

    name: ClassVar[str] = "parametric_tumour"
    renamed_params: ClassVar[Mapping[str, str]] = {"center_ras_mm": "centre_ras_mm"}
    centre_ras_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
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
        set_field(self, "centre_ras_mm", vec3(self.centre_ras_mm, "centre_ras_mm"))
        radii = vec3(self.radii_mm, "radii_mm")
        if min(radii) <= 0:
            raise EditError(f"radii_mm must be positive, got {radii}")
        set_field(self, "radii_mm", radii)
        for field_name in ("rim_mm", "oedema_mm"):
            set_field(self, field_name, finite(getattr(self, field_name), field_name, low=0.0))
        set_field(self, "irregularity", finite(self.irregularity, "irregularity", 0.0, 1.0))
        set_field(self, "necrosis", flag(self.necrosis, "necrosis"))
        set_field(self, "keep_existing", flag(self.keep_existing, "keep_existing"))
        set_field(self, "seed", check_seed(self.seed))

    def check(self, grid: Grid) -> None:
        """Refuse, before anything is allocated, a centre or lengths beyond the grid and a tumour narrower than one
        voxel along any RAS axis (a radius under half the voxel's width there): that drew a single voxel of
        ET, or none, in a full oedema shell.  A tumour that rasterises to no voxel is refused in :meth:`apply`."""
        check_point(self.centre_ras_mm, "parametric tumour centre", grid)
        check_length(max(self.radii_mm), "tumour radius", grid)
        check_length(self.rim_mm, "rim", grid)
        check_length(self.oedema_mm, "oedema margin", grid)
        width = np.abs(grid.index_to_lps_matrix).sum(axis=1)  # one voxel's box projected on each axis (mm)
        for axis, radius, across in zip("xyz", self.radii_mm, width):
            if 2.0 * radius < across:
                raise EditError(f"tumour radius {radius:.6g} mm along RAS {axis} is under half a voxel (a voxel is "
                                f"{across:.3g} mm across along {axis} on this grid): the tumour would be smaller "
                                f"than a voxel; give at least {across / 2.0:.3g} mm")

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

    def _box(self, grid: Grid, half_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index box ``(lo, hi)`` of the RAS-aligned cuboid ``centre +- half_mm``, plus a margin."""
        corners_ras = np.array([np.asarray(self.centre_ras_mm) + half_mm * np.array([a, b, c])
                                for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
        corners_kji = grid.lps_to_index(ras_to_lps(corners_ras.T).T)[:, ::-1]
        return (np.floor(corners_kji.min(axis=0)).astype(int) - 1, np.ceil(corners_kji.max(axis=0)).astype(int) + 2)

    def _shape(self, grid: Grid, lo: np.ndarray, hi: np.ndarray, stride: int,
               noise_fields: tuple[np.ndarray, float, float], which: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised distance and perturbation ``which`` (0 tumour, 1 oedema) on the box lattice (every ``stride``)."""
        radii = np.asarray(self.radii_mm)
        fields, step, extent = noise_fields
        # Normalised RAS coordinates u of every box voxel (k, j, i broadcast, no full index grid).
        kk, jj, ii = np.ogrid[lo[0]:hi[0]:stride, lo[1]:hi[1]:stride, lo[2]:hi[2]:stride]
        m = grid.index_to_lps_matrix
        lps = [grid.origin[r] + m[r, 0] * ii + m[r, 1] * jj + m[r, 2] * kk for r in range(3)]
        ras = [-lps[0], -lps[1], lps[2]]
        shape = (kk.shape[0], jj.shape[1], ii.shape[2])
        u = [np.broadcast_to((ras[r] - self.centre_ras_mm[r]) / radii[r], shape) for r in range(3)]
        distance = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        coords = np.stack([(c + extent) / step for c in u])
        noise = ndimage.map_coordinates(fields[which], coords, order=1, mode="nearest")
        return distance, noise

    def apply(self, labelmap: LabelMap) -> np.ndarray:
        grid, labels = labelmap.grid, labelmap.array
        centre_kji = grid.lps_to_index(ras_to_lps(self.centre_ras_mm))[::-1]
        voxel = np.round(centre_kji).astype(int)
        if np.any(voxel < 0) or np.any(voxel >= labels.shape) or labels[tuple(voxel)] == Label.BACKGROUND:
            raise EditError(f"parametric tumour centre {tuple(round(v, 1) for v in self.centre_ras_mm)} "
                            "(RAS mm) is outside the brain")
        radii = np.asarray(self.radii_mm)
        oedema = self.oedema_mm / float(radii.mean())
        amplitude = 0.5 * self.irregularity
        reach = (1.0 + oedema) * (1.0 + amplitude * self._NOISE_CLIP)  # farthest normalised distance
        margin_mm = 2.0 * max(grid.spacing)
        full_lo, full_hi = self._box(grid, reach * radii + margin_mm)
        # The box clipped to the brain's box (+2 voxels): tumour and oedema outside the brain are clipped.
        brain = brain_mask(labels)
        brain_lo, brain_hi = bounds(brain)  # type: ignore[misc]  # the centre is in the brain: never empty
        lo, hi = np.maximum(full_lo, brain_lo - 2), np.minimum(full_hi, brain_hi + 2)

        noise_fields = self._noise_fields(reach + 0.5)
        distance, noise = self._shape(grid, lo, hi, 1, noise_fields, 0)
        # Multiplicative perturbation of the radius: the centre is always inside.
        tumour = distance / (1.0 + amplitude * noise) <= 1.0
        del noise
        tumour = _component_at(tumour, voxel - lo)

        brain_box = crop(brain, lo, hi, fill=False)
        n_tumour = int(np.count_nonzero(tumour))
        if n_tumour == 0:
            raise EditError("parametric tumour is smaller than a voxel")
        outside = int(np.count_nonzero(tumour & ~brain_box))
        beyond = self._core_beyond_box(grid, lo, hi, noise_fields, amplitude, margin_mm)
        fraction = (outside + beyond) / (n_tumour + beyond)
        if fraction > MAX_OUTSIDE_FRACTION:
            raise EditError(f"parametric tumour core does not fit in the brain "
                            f"({100.0 * fraction:.1f}% of it would be outside)")
        tumour &= brain_box

        sampling = np.asarray(grid.spacing)[::-1]
        if self.necrosis and self.rim_mm > 0:
            depth = ndimage.distance_transform_edt(tumour, sampling=sampling)
            # Erosion with the full 3x3x3 element guarantees every NCR neighbour is tumour.
            ncr = tumour & (depth > self.rim_mm) & ndimage.binary_erosion(tumour, FULL_3X3)
            del depth
        elif self.necrosis:
            ncr = tumour & ndimage.binary_erosion(tumour, FULL_3X3)
        else:
            ncr = np.zeros_like(tumour)

        base = labels if self.keep_existing else healthy_anatomy(labels, grid.spacing)
        base_box = crop(base, lo, hi)
        if self.oedema_mm > 0:
            _, noise = self._shape(grid, lo, hi, 1, noise_fields, 1)
            oedema_region = distance / (1.0 + amplitude * noise) <= 1.0 + oedema
            del noise
            # At least a one-voxel shell so the rim is always wrapped in oedema.
            oedema_region |= ndimage.binary_dilation(tumour, FULL_3X3)
            ed = oedema_region & ~tumour & ((base_box == Label.GM) | (base_box == Label.WM))
            # Drop oedema islands that the perturbation cut off from the tumour.
            components, _ = ndimage.label(ed | tumour, FULL_3X3)
            keep = np.unique(components[tumour])
            ed &= np.isin(components, keep[keep > 0])
        else:
            ed = np.zeros_like(tumour)

        box_labels = np.zeros(tumour.shape, dtype=np.uint8)
        box_labels[ed] = Label.ED
        box_labels[tumour] = Label.ET
        box_labels[ncr] = Label.NCR
        full = np.zeros(labels.shape, dtype=np.uint8)
        paste(full, box_labels, lo)
        return composite(base, full, brain)

    def _core_beyond_box(self, grid: Grid, lo: np.ndarray, hi: np.ndarray,
                         noise_fields: tuple[np.ndarray, float, float], amplitude: float, margin_mm: float) -> float:
        """Estimated tumour voxels outside the box ``lo:hi`` (all outside the brain), from a coarse lattice.

        Zero when the box holds the tumour's whole reach, which is the usual case; otherwise the
        shape is evaluated every ``stride`` voxels over its own box (at most ~2 million points),
        so that a tumour mostly outside the brain is still refused without a full-size array.
        """
        core_lo, core_hi = self._box(grid, (1.0 + amplitude * self._NOISE_CLIP) * np.asarray(self.radii_mm)
                                     + margin_mm)
        if np.all(core_lo >= lo) and np.all(core_hi <= hi):
            return 0.0
        voxels = float(np.prod((core_hi - core_lo).astype(float)))
        stride = max(1, int(np.ceil((voxels / _COARSE_POINTS) ** (1.0 / 3.0))))
        distance, noise = self._shape(grid, core_lo, core_hi, stride, noise_fields, 0)
        tumour = distance / (1.0 + amplitude * noise) <= 1.0
        kji = [np.arange(a, b, stride) for a, b in zip(core_lo, core_hi)]
        inside = [(k >= a) & (k < b) for k, a, b in zip(kji, lo, hi)]
        in_box = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        return float(np.count_nonzero(tumour & ~in_box)) * stride ** 3


def _component_at(mask: np.ndarray, seed_kji: np.ndarray) -> np.ndarray:
    """The connected component of ``mask`` holding ``seed_kji`` (else the largest one)."""
    components, count = ndimage.label(mask, FULL_3X3)
    if count <= 1:
        return mask
    inside = np.all(seed_kji >= 0) and np.all(seed_kji < mask.shape)
    chosen = components[tuple(seed_kji)] if inside else 0
    if chosen == 0:
        chosen = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    return components == chosen
