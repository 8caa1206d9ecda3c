"""Fast preview of an edited label map: a warm engine that re-renders only what changed.

:class:`PreviewRenderer` keeps the last :class:`~.synthesize.SynthesisResult` of
one label map.  The first call synthesises the whole brain; every later call on
the same grid runs :meth:`~.synthesize.SynthesisEngine.rerender` (the network on
the box around the changed voxels only) and reports that box, so a caller that
holds the previous images (the Slicer module) copies back only the box.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..schema.grid import LabelMap
from .synthesize import SynthesisEngine, SynthesisResult


@dataclass
class PreviewUpdate:
    """One preview.

    Attributes:
        result: the full synthetic case (images in scanner units, float32).
        box: ``(start, stop)`` (k, j, i) of the region that may differ from the
            previous preview; the whole volume after a full synthesis.
        full: True when the whole case was synthesised (first preview, new grid).
        seconds: time taken.
    """

    result: SynthesisResult
    box: tuple[tuple[int, int, int], tuple[int, int, int]]
    full: bool
    seconds: float

    def region(self, modality: str) -> np.ndarray:
        """The images of ``modality`` inside :attr:`box` (a view, no copy)."""
        (k0, j0, i0), (k1, j1, i1) = self.box
        return self.result.images[modality][k0:k1, j0:j1, i0:i1]


class PreviewRenderer:
    """Previews successive edits of one label map with one loaded model.

    Args:
        engine: the loaded model (kept warm between previews).
        margin: voxels of context around the changed box (see ``rerender``).
    """

    def __init__(self, engine: SynthesisEngine, margin: int = 24) -> None:
        self.engine = engine
        self.margin = margin
        self.last: SynthesisResult | None = None

    def reset(self) -> None:
        """Forget the last result: the next preview synthesises the whole case."""
        self.last = None

    def render(self, labelmap: LabelMap, seed: int = 0) -> PreviewUpdate:
        """The preview of ``labelmap``: a full synthesis the first time, then only the changed box."""
        start = time.perf_counter()
        previous = self.last
        if previous is None or previous.labelmap.grid != labelmap.grid \
                or previous.provenance.get("seed") != seed:
            result = self.engine.synthesize(labelmap, seed=seed)
            box = ((0, 0, 0), tuple(int(s) for s in labelmap.array.shape))
            full = True
        else:
            changed = labelmap.array != previous.labelmap.array
            result = self.engine.rerender(previous, labelmap, margin=self.margin)
            full = False
            if changed.any():
                idx = np.argwhere(changed)
                # rerender writes inside the changed box grown by the margin and rounded up to the
                # network's size multiple; report that whole region.
                grow = self.margin + self.engine.network.size_multiple
                lo = np.maximum(idx.min(0) - grow, 0)
                hi = np.minimum(idx.max(0) + 1 + grow, labelmap.array.shape)
                box = (tuple(int(v) for v in lo), tuple(int(v) for v in hi))
            else:
                box = ((0, 0, 0), (0, 0, 0))
        self.last = result
        return PreviewUpdate(result, box, full, time.perf_counter() - start)  # type: ignore[arg-type]
