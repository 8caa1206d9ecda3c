"""Interactive preview: one case kept in memory, each edit re-rendered in the region it changed.

A :class:`PreviewSession` holds the current label map of one case and a
:class:`RoiRenderer`, which holds the current images.  The first render makes
the whole case; afterwards the caller sends only the region of the label map
that an edit touched (:meth:`PreviewSession.set_labels`), and
:meth:`PreviewSession.render` re-renders the region around the voxels that
changed and returns that region of the four images, nothing else.

The renderer is pluggable, chosen by name in :data:`PREVIEW_RENDERERS`:
:class:`SynthesisRoiRenderer` (the label-to-image network,
:meth:`~.synthesize.SynthesisEngine.rerender_box`) for a synthetic case, and
:class:`InpaintingRoiRenderer` for a real case: its own images, the edited
tumour region inpainted as Generate inpaints it.

Renders can be interrupted: the ``check`` callback passed to :meth:`render` is
called before every layer of the network and stops the render by raising.  A
stopped render leaves the images as they were and keeps its region pending, so
the next render (of a newer edit) covers both edits: a newer edit supersedes an
older one without losing it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np

from ..schema.errors import MedSynthError
from ..schema.grid import AxisOrder, LabelMap
from ..schema.labels import check_label_map
from .synthesize import SynthesisEngine

#: (start, stop) of a box in (k, j, i) voxels, stop exclusive.
Box = tuple[tuple[int, int, int], tuple[int, int, int]]
EMPTY_BOX: Box = ((0, 0, 0), (0, 0, 0))


def box_union(a: Box | None, b: Box | None) -> Box | None:
    """The smallest box holding both (``None`` is the empty box)."""
    if a is None:
        return b
    if b is None:
        return a
    return (tuple(min(x, y) for x, y in zip(a[0], b[0])),  # type: ignore[return-value]
            tuple(max(x, y) for x, y in zip(a[1], b[1])))


def changed_box(before: np.ndarray, after: np.ndarray, offset: tuple[int, ...] = (0, 0, 0)) -> Box | None:
    """Bounding box of the voxels where two equally shaped arrays differ, shifted by ``offset``; ``None`` if equal.

    Projections along each axis (``np.any``) instead of an index of every changed voxel.
    """
    changed = before != after
    if not changed.any():
        return None
    lo, hi = [], []
    for axis in range(changed.ndim):
        hit = np.flatnonzero(changed.any(axis=tuple(a for a in range(changed.ndim) if a != axis)))
        lo.append(int(hit[0]) + int(offset[axis]))
        hi.append(int(hit[-1]) + 1 + int(offset[axis]))
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in zip(box[0], box[1]))


class PreviewCancelled(MedSynthError):
    """A render was stopped by its ``check`` callback (a newer edit, or the user)."""


@contextlib.contextmanager
def interruptible(module: Any, check: Callable[[], None] | None) -> Iterator[None]:
    """Call ``check`` before every layer of a torch module while the block runs.

    ``check`` stops the forward pass by raising; a network pass cannot be stopped
    otherwise, and a layer takes tens of milliseconds, so a stop takes about that long.
    """
    if check is None:
        yield
        return
    handles = [m.register_forward_pre_hook(lambda _module, _inputs: check()) for m in module.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class RoiRenderer(Protocol):
    """What the preview needs of a model: the whole case once, then a region around each change.

    Attributes:
        images: modality -> (k, j, i) float32 images of the label map last rendered.
    """

    images: dict[str, np.ndarray]

    def full(self, labelmap: LabelMap, check: Callable[[], None] | None = None) -> None:
        """Render the whole case of ``labelmap`` into :attr:`images`."""

    def roi(self, labelmap: LabelMap, changed: Box, check: Callable[[], None] | None = None) -> Box:
        """Re-render around ``changed`` (the voxels whose label changed since the last render).

        Returns the box of :attr:`images` that was rewritten.  Raises (through ``check``)
        without changing :attr:`images` when stopped.
        """


class SynthesisRoiRenderer:
    """The label-to-image network as a preview renderer (:meth:`SynthesisEngine.rerender_box`).

    Args:
        engine: the loaded model.
        seed: the appearance seed of the case (models with an appearance code).
        margin: voxels of network context around the changed box.
    """

    name = "synthesis"

    def __init__(self, engine: SynthesisEngine, seed: int = 0, margin: int = 24) -> None:
        self.engine = engine
        self.seed = int(seed)
        self.margin = int(margin)
        self.images: dict[str, np.ndarray] = {}
        self.normalized: np.ndarray | None = None
        self.brain: tuple[slice, ...] | None = None
        self.brain_mask: np.ndarray | None = None

    def full(self, labelmap: LabelMap, check: Callable[[], None] | None = None) -> None:
        from ..schema.labels import brain_mask
        from .inference import brain_box

        with interruptible(self.engine.synth.generator, check):
            result = self.engine.synthesize(labelmap, seed=self.seed)
        self.images, self.normalized = result.images, result.normalized
        self.brain, self.brain_mask = brain_box(labelmap.array), brain_mask(labelmap.array)

    def roi(self, labelmap: LabelMap, changed: Box, check: Callable[[], None] | None = None) -> Box:
        from ..schema.labels import brain_mask
        from .inference import brain_box

        if self.normalized is None or self.brain is None or self.brain_mask is None:
            raise MedSynthError("the preview has no rendered case yet")
        region = box_slices(changed)
        brain = self.brain
        inside = brain_mask(labelmap.array[region])
        if not np.array_equal(inside, self.brain_mask[region]):  # tumour edits never do this; a painted brain may
            brain = brain_box(labelmap.array)
            if brain == self.brain:
                self.brain_mask[region] = inside
        if brain != self.brain:
            # The network runs on the brain box: another box is another stride lattice, so a
            # full synthesis of the edited map differs everywhere.  Render it whole.
            self.full(labelmap, check)
            shape = labelmap.array.shape
            return (0, 0, 0), (int(shape[0]), int(shape[1]), int(shape[2]))
        self.engine._use_seed(self.seed)
        self.engine._use_axis_order(labelmap)  # the engine may have synthesised another map since full()
        with interruptible(self.engine.synth.generator, check):
            box = self.engine.rerender_box(self.normalized, self.images, labelmap.array, changed[0], changed[1],
                                           brain, self.margin)
        return (tuple(s.start for s in box), tuple(s.stop for s in box))  # type: ignore[return-value]


class InpaintingRoiRenderer:
    """A real case as the preview: its own images, the edited tumour region inpainted (the Generate of a real case).

    :meth:`full` shows the patient's images as stored (as float32); when the label map's tumour already
    differs from the case's own segmentation it inpaints that difference, as :meth:`roi` does.
    :meth:`roi` re-renders the region :func:`~.inpainting.inpaint_case` re-renders for the current label
    map (the case's own tumour and the new one, grown by ``margin_mm``, in the brain) from the real images,
    blended as it blends them, so after every edit the preview equals what Generate writes for the same
    labels, bit for bit (in float32); the box written back also covers the previous region, which turns
    back into the real images where it is no longer re-rendered.  Outside the region every voxel is the
    real image's.

    Args:
        engine: a loaded inpainting model (:class:`~.inpainting.InpaintingEngine`).
        context: the real case (:class:`~.inpainting.ContextCase`, or its folder, read on :meth:`full`).
        margin_mm: growth of the changed tumour into the region (the default of ``inpaint_case``).
        feather_mm: width of the blend inside the region's border.
        old_labels: the label map before the edits (``inpaint_case``'s ``old_labelmap``): the region is then what
            changed since it, and its tumour is the old one instead of the case's segmentation.

    Without ``old_labels``, for a case without a tumour segmentation, the old tumour is what the label map's
    history says exactly, read again at every render as :func:`~.inpainting.plan_region` reads it; where the
    history does not say it, :meth:`full` and :meth:`roi` refuse with Generate's own reason (a preview that
    inpainted around the new tumour only would show an unsegmented tumour of the patient as if it were gone).
    """

    name = "inpainting"

    def __init__(self, engine: Any, context: Any, margin_mm: float | None = None,
                 feather_mm: float | None = None, old_labels: np.ndarray | None = None) -> None:
        from .inpainting import DEFAULT_FEATHER_MM, DEFAULT_MARGIN_MM

        self.engine = engine
        self.context = context
        self.margin_mm = DEFAULT_MARGIN_MM if margin_mm is None else float(margin_mm)
        self.feather_mm = DEFAULT_FEATHER_MM if feather_mm is None else float(feather_mm)
        self.old_labels = old_labels
        self.images: dict[str, np.ndarray] = {}
        self.region: np.ndarray | None = None  # the voxels of :attr:`images` that are (partly) synthetic
        self.region_box: Box | None = None
        self.own_grown: np.ndarray | None = None  # the case's own tumour grown by the margin (every region has it)
        self.moments: Any = None  # :class:`~.inpainting.TissueMoments` of the case: its normalisers after an edit

    def _spacing(self, labelmap: LabelMap) -> tuple[float, float, float]:
        return tuple(float(s) for s in labelmap.grid.spacing[::-1])  # type: ignore[return-value]

    def _tumour_from_history(self, labelmap: LabelMap) -> np.ndarray | None:
        """The old tumour of a case without segmentation nor old labels: what the history says, else refused."""
        from .inpainting import old_tumour_from_history, plan_region

        old, problem = old_tumour_from_history(labelmap)
        if problem is not None:
            plan_region(labelmap, self.context, margin_mm=self.margin_mm)  # raises Generate's refusal, word for word
            raise MedSynthError(problem)  # not reached: plan_region refuses the same history
        return old

    def full(self, labelmap: LabelMap, check: Callable[[], None] | None = None) -> None:
        from ..schema.labels import tumour_mask
        from .inpainting import ContextCase, TissueMoments, grown_tumour, read_context

        if not isinstance(self.context, ContextCase):
            self.context = read_context(self.context, labelmap)  # on the label map's grid, or one clear line
        if self.old_labels is not None and self.old_labels.shape != labelmap.array.shape:
            raise MedSynthError(f"the label map before the edits {self.old_labels.shape} is not on the label map's "
                                f"grid {labelmap.array.shape}")
        if self.context.tumour is not None:
            own = self.context.tumour
        else:
            from_history = self._tumour_from_history(labelmap) if self.old_labels is None else None
            own = (np.zeros(labelmap.array.shape, np.uint8) if from_history is None
                   else np.where(from_history, labelmap.array, 0).astype(np.uint8))
        self.images = {m: image.astype(np.float32) for m, image in self.context.images.items()}
        self.region, self.region_box = None, None
        # Kept for every later render: what does not change with the edits is computed once per case.
        self.own_grown = grown_tumour(own > 0, own.shape, self.margin_mm, self._spacing(labelmap))
        self.moments = TissueMoments(self.context.images, labelmap.array)
        edited = (not np.array_equal(labelmap.array, self.old_labels) if self.old_labels is not None
                  else not np.array_equal(np.where(tumour_mask(labelmap.array), labelmap.array, 0), own))
        if edited:
            self.roi(labelmap, EMPTY_BOX, check)  # edited before the first preview: inpainted as Generate does

    def roi(self, labelmap: LabelMap, changed: Box, check: Callable[[], None] | None = None) -> Box:
        from ..schema.grid import mask_box
        from ..schema.labels import tumour_mask
        from .inpainting import changed_region

        if not self.images or not hasattr(self.context, "images"):
            raise MedSynthError("the preview has no rendered case yet")
        if check is not None:
            check()
        spacing = self._spacing(labelmap)
        if self.old_labels is not None:  # what changed since the old labels, as inpaint_case takes it
            region = changed_region(labelmap.array, tumour_mask(self.old_labels), self.margin_mm, spacing,
                                    self.old_labels)
        elif self.context.tumour is not None:
            region = changed_region(labelmap.array, self.context.tumour > 0, self.margin_mm, spacing,
                                    old_grown=self.own_grown)  # the region inpaint_case takes
        else:  # the history's old tumour, as it says now (every edit extends it): as plan_region takes it
            region = changed_region(labelmap.array, self._tumour_from_history(labelmap), self.margin_mm, spacing)
        tight: Box | None = None
        if region.any():
            if check is not None:
                check()
            with interruptible(self.engine.synth.generator, check):
                inner, values, _ = self.engine.inpaint_box(labelmap.array, self.context.images, region, spacing,
                                                           self.feather_mm, check, self.moments,
                                                           AxisOrder.from_grid(labelmap.grid))
            region_slices = mask_box(region, 0)  # outside it the inpainted box holds the real images
            tight = (tuple(s.start for s in region_slices), tuple(s.stop for s in region_slices))  # type: ignore
        written = box_union(self.region_box, tight)
        if written is None:
            return EMPTY_BOX
        # Nothing is written before the network has finished: a stopped render leaves the images as they were.
        outer = box_slices(written)
        for m, real in self.context.images.items():
            update = real[outer].astype(np.float32)
            if tight is not None:
                into = tuple(slice(a - o.start, b - o.start) for a, b, o in zip(*tight, outer))
                taken = tuple(slice(a - i.start, b - i.start) for a, b, i in zip(*tight, inner))
                update[into] = values[m][taken]
            self.images[m][outer] = update
        self.region, self.region_box = (region if tight is not None else None), tight
        return written


#: Preview renderers by name: ``factory(engine, **options)`` (synthesis: ``seed``, ``margin``; inpainting:
#: ``context``, ``margin_mm``, ``feather_mm``).
PREVIEW_RENDERERS: dict[str, Callable[..., RoiRenderer]] = {"synthesis": SynthesisRoiRenderer,
                                                            "inpainting": InpaintingRoiRenderer}


def make_renderer(name: str, engine: Any, **options: Any) -> RoiRenderer:
    """The preview renderer registered as ``name``."""
    if name not in PREVIEW_RENDERERS:
        raise MedSynthError(f"unknown preview renderer {name!r} (known: {', '.join(sorted(PREVIEW_RENDERERS))})")
    return PREVIEW_RENDERERS[name](engine, **options)


@dataclass
class PreviewUpdate:
    """One render of a :class:`PreviewSession`.

    Attributes:
        box: the region of the images that was rewritten (:data:`EMPTY_BOX` when nothing changed).
        regions: modality -> that region of the images (views; copy them to keep them).
        full: whether the whole case was rendered.
        seconds: stage -> seconds (``render``: the renderer).
    """

    box: Box
    regions: dict[str, np.ndarray]
    full: bool
    seconds: dict[str, float] = field(default_factory=dict)


class PreviewSession:
    """The label map of one case and its images, updated region by region.

    Args:
        renderer: renders the images (holds them).
        labelmap: the case's label map (copied: the session owns its array).
    """

    def __init__(self, renderer: RoiRenderer, labelmap: LabelMap) -> None:
        self.renderer = renderer
        # The privacy record with the history: the inpainting renderer reads both as Generate does.
        self.labelmap = LabelMap(np.array(labelmap.array, copy=True), labelmap.grid, list(labelmap.history),
                                 privacy=labelmap.privacy)
        self.version = 0
        self.rendered = False  # the renderer holds images of an earlier state of the label map
        self.pending: Box | None = None  # where the labels changed since the last finished render

    def set_labels(self, start: tuple[int, int, int], region: np.ndarray,
                   history: list[dict[str, Any]] | None = None, privacy: Any = None) -> Box | None:
        """Write a region of the label map at ``start`` (k, j, i); returns the box of voxels that changed.

        ``history``, when given, and ``privacy`` (a :class:`~..schema.provenance.PrivacyRecord`, None: not
        measured) are the label map's records after the edit.

        The change is pending until a render finishes; the version counts every call.

        Raises:
            MedSynthError: the region does not fit the grid.
        """
        array = self.labelmap.array
        stop = tuple(int(a) + int(n) for a, n in zip(start, region.shape))
        if region.ndim != 3 or any(int(a) < 0 for a in start) or any(b > n for b, n in zip(stop, array.shape)):
            raise MedSynthError(f"label region {tuple(region.shape)} at {tuple(start)} does not fit the grid "
                                f"{tuple(array.shape)}")
        try:
            check_label_map(region)
        except ValueError as exc:
            raise MedSynthError(f"label region: {exc}") from None
        window = array[tuple(slice(int(a), b) for a, b in zip(start, stop))]
        changed = changed_box(window, region, start)
        if changed is not None:
            window[...] = region
            self.pending = box_union(self.pending, changed)
        if history is not None:  # a record kept from before the edit would not describe the new history
            self.labelmap.history, self.labelmap.privacy = list(history), privacy
        self.version += 1
        return changed

    def render(self, check: Callable[[], None] | None = None) -> PreviewUpdate:
        """Render what is pending: the whole case the first time, else the region around the changes."""
        start = time.perf_counter()
        if not self.rendered:
            self.renderer.full(self.labelmap, check)
            self.rendered, self.pending = True, None
            shape = tuple(int(n) for n in self.labelmap.array.shape)
            box: Box = ((0, 0, 0), shape)  # type: ignore[assignment]
            full = True
        elif self.pending is None:
            box, full = EMPTY_BOX, False
        else:
            box = self.renderer.roi(self.labelmap, self.pending, check)
            full = box == ((0, 0, 0), tuple(int(n) for n in self.labelmap.array.shape))
            self.pending = None
        slices = box_slices(box)
        regions = {m: image[slices] for m, image in self.renderer.images.items()}
        return PreviewUpdate(box, regions, full, {"render": time.perf_counter() - start})

    @property
    def images(self) -> Mapping[str, np.ndarray]:
        return self.renderer.images


__all__ = ["Box", "EMPTY_BOX", "InpaintingRoiRenderer", "PREVIEW_RENDERERS", "PreviewCancelled", "PreviewSession",
           "PreviewUpdate",
           "RoiRenderer", "SynthesisRoiRenderer", "box_slices", "box_union", "changed_box", "interruptible",
           "make_renderer"]
