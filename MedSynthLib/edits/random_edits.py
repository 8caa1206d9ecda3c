"""Random tumour edits: sample parameters, then apply the deterministic edits.

The label map the sampler returns ends with a :class:`RandomTumourDraw` record (its seed and
options: the draw can be read and made again) and then the records of the edits it drew, so
:func:`~MedSynthLib.edits.records.replay` rebuilds it bit for bit even where another version of
the sampler would draw otherwise.
(The module is not called ``random`` so that it never shadows the standard library.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..schema.errors import EditError
from ..schema.grid import LabelMap, lps_to_ras
from ..schema.labels import Label, brain_mask, tumour_mask
from .base import Edit, finite, register, set_field
from .geometry import brain_box_lps
from .parametric import ParametricTumour, check_seed
from .transforms import Flip, Rotate, Scale, Translate


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

    name: ClassVar[str] = "random_tumour"
    translate_mm: float = 20.0
    rotate_deg: float = 30.0
    scale_range: tuple[float, float] = (0.7, 1.3)
    p_flip: float = 0.5
    flip_about: str = "tumour"
    p_parametric: float = 0.25
    radius_fraction: tuple[float, float] = (0.08, 0.2)
    max_tries: int = 10

    def __post_init__(self) -> None:
        for name in ("p_flip", "p_parametric"):
            set_field(self, name, finite(getattr(self, name), name, 0.0, 1.0))  # probabilities
        set_field(self, "translate_mm", finite(self.translate_mm, "translate_mm", 0.0))
        set_field(self, "rotate_deg", finite(self.rotate_deg, "rotate_deg", 0.0, 360.0))
        set_field(self, "scale_range", self._range(self.scale_range, "scale_range", 0.05, 20.0))
        set_field(self, "radius_fraction", self._range(self.radius_fraction, "radius_fraction", 0.0, 1.0))
        if self.flip_about not in ("tumour", "brain"):
            raise EditError(f"flip_about must be 'tumour' or 'brain', got {self.flip_about!r}")
        if not isinstance(self.max_tries, (int, np.integer)) or not 1 <= self.max_tries <= 1000:
            raise EditError(f"max_tries must be an integer in [1, 1000], got {self.max_tries!r}")

    @staticmethod
    def _range(value: object, name: str, low: float, high: float) -> tuple[float, float]:
        try:
            first, last = value  # type: ignore[misc]
        except (TypeError, ValueError):
            raise EditError(f"{name} must be two numbers (low, high), got {value!r}") from None
        first, last = finite(first, name, low, high), finite(last, name, low, high)
        if first > last:
            raise EditError(f"{name} must be (low, high) with low <= high, got {value!r}")
        return first, last

    def draw(self, labelmap: LabelMap, rng: np.random.Generator) -> list[Edit]:
        """One draw of edits (not yet checked); ``rng`` advances."""
        has_tumour = bool(tumour_mask(labelmap.array).any())
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
            candidates = np.flatnonzero(brain_mask(labels))
        if candidates.size == 0:
            raise EditError("the label map has no brain to put a tumour in")
        kji = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], labels.shape), float)
        centre = lps_to_ras(labelmap.grid.index_to_lps(kji[::-1]))
        b_min, b_max = brain_box_lps(labelmap)
        half_extent = float(np.mean(b_max - b_min)) / 2.0
        base = half_extent * rng.uniform(*self.radius_fraction)
        radii = base * rng.uniform(0.8, 1.2, 3)
        return ParametricTumour(
            centre_ras_mm=tuple(float(v) for v in centre),  # type: ignore[arg-type]
            radii_mm=tuple(float(v) for v in radii),  # type: ignore[arg-type]
            rim_mm=float(rng.uniform(1.5, 3.0)),
            necrosis=bool(rng.random() < 0.8),
            oedema_mm=float(base * rng.uniform(0.3, 1.0)),
            irregularity=float(rng.uniform(0.1, 0.5)),
            seed=int(rng.integers(2**31 - 1)),
        )

    def _sample(self, labelmap: LabelMap, seed: int) -> tuple[list[Edit], LabelMap]:
        rng = np.random.default_rng(check_seed(seed))
        last: EditError | None = None
        for _ in range(self.max_tries):
            edits = self.draw(labelmap, rng)
            try:
                result = labelmap
                for edit in edits:
                    result = edit(result)
            except EditError as exc:
                last = exc
                continue
            # As applied: a Translate's record also holds the whole-voxel offset it moved.
            from .records import edit_from_record

            drawn = result.history[len(labelmap.history):]
            draw = RandomTumourDraw(seed=seed, drawn_edits=len(drawn), **dataclasses.asdict(self))
            # The draw's record changes no voxel (nor the measured privacy): it goes before what it drew.
            result = dataclasses.replace(result, history=[*labelmap.history, draw.to_record(), *drawn])
            return [edit_from_record(r) for r in drawn], result
        raise EditError(f"no valid random tumour edit in {self.max_tries} tries (last: {last})")

    def sample(self, labelmap: LabelMap, seed: int) -> list[Edit]:
        """The deterministic edits drawn for ``seed`` (validated on ``labelmap``)."""
        return self._sample(labelmap, seed)[0]

    def __call__(self, labelmap: LabelMap, seed: int) -> LabelMap:
        """Apply a random edit; the new history records the draw, then the edits that replay it bit-identically."""
        return self._sample(labelmap, seed)[1]


@register
@dataclass(frozen=True)
class RandomTumourDraw(Edit):
    """The record of one :class:`RandomTumourEdit` draw: its seed, its options and how many edits it drew.

    It stands in the history just before the edits it drew, so the draw can be read and made again
    (:meth:`sampler` called with :attr:`seed`).  Applying it changes no voxel: the drawn edits after it
    replay on their own.  Every field but ``drawn_edits`` is required (a record always holds them all).
    """

    name: ClassVar[str] = "random_tumour"
    _outcomes: ClassVar[tuple[str, ...]] = ("drawn_edits",)
    seed: int | None = None
    translate_mm: float | None = None
    rotate_deg: float | None = None
    scale_range: tuple[float, float] | None = None
    p_flip: float | None = None
    flip_about: str | None = None
    p_parametric: float | None = None
    radius_fraction: tuple[float, float] | None = None
    max_tries: int | None = None
    drawn_edits: int | None = None  # the records after this one that the draw made

    def __post_init__(self) -> None:
        missing = [f.name for f in dataclasses.fields(self) if f.name not in self._outcomes
                   and getattr(self, f.name) is None]
        if missing:
            raise EditError(f"a {self.name} record needs {', '.join(missing)}")
        set_field(self, "seed", check_seed(self.seed))
        sampler = self.sampler()  # the options checked and normalised as the sampler's own
        for f in dataclasses.fields(sampler):
            set_field(self, f.name, getattr(sampler, f.name))
        count = self.drawn_edits
        if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1):
            raise EditError(f"drawn_edits must be a whole number of at least 1, got {count!r}")
        if count is not None:
            set_field(self, "drawn_edits", int(count))

    def sampler(self) -> RandomTumourEdit:
        """The sampler that made this draw (its options)."""
        return RandomTumourEdit(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RandomTumourEdit)})

    def apply(self, labelmap: LabelMap, *args: object, **kwargs: object) -> np.ndarray:
        return labelmap.array.copy()

    def redraw(self, labelmap: LabelMap, recorded: list[dict]) -> LabelMap:
        """The draw made again on ``labelmap`` (the map before it), checked against the ``recorded`` records that
        follow it: the map it makes, its history ending with this record and the edits drawn.

        The record alone changes no voxel, so a changed seed or option would otherwise replay unnoticed.

        Raises:
            DrawMismatch: the seed and options draw other edits on this map than those recorded (a record edited
                by hand, or another map than the one it was drawn on).
        """
        from .records import edit_from_record

        what = f"its {self.name} record (seed {self.seed})"
        try:
            edits, result = self.sampler()._sample(labelmap, self.seed)  # type: ignore[arg-type]
        except EditError as exc:
            raise DrawMismatch(f"{what} does not draw the edits recorded after it on this map: it draws none ({exc})"
                               ) from None
        drawn = result.history[len(labelmap.history) + 1:]
        count = len(drawn) if self.drawn_edits is None else self.drawn_edits
        # Compared as this MedSynth writes them (an older spelling is read as the current one).
        recorded_edits = [edit_from_record(r).to_record() for r in recorded[:count]]
        if count != len(drawn) or recorded_edits != drawn:
            names = ", ".join(r["name"] for r in drawn)
            listed = ", ".join(r["name"] for r in recorded_edits) or "none"
            same = names == listed
            raise DrawMismatch(f"{what} does not draw the edits recorded after it on this map: it draws "
                               f"{names}{' with other parameters' if same else ''}, the record holds {listed}")
        return dataclasses.replace(result, history=[*labelmap.history, self.to_record(), *drawn])


class DrawMismatch(EditError):
    """A :class:`RandomTumourDraw` record whose seed and options draw other edits than those recorded after it."""
