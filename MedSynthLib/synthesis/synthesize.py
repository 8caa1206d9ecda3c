"""``medsynth synthesize``: a label map in, a complete synthetic case out.

The output folder holds ``t1, t1ce, t2, flair`` (NIfTI in realistic scanner
ranges, 0 outside the brain; int16 like BraTS when the range allows, else
float32) and ``labels.nii.gz`` on exactly the label map's grid, plus
``provenance.json``: model name, weights and config sha256, label-map sha256, the
edits that made the label map, how close it stays to a source patient, seed, device,
precision, how each network pass ran (whole volume or sliding windows), software
versions, timings and the sha256 of every file
(:mod:`MedSynthLib.synthesis.case_folder` owns the folder format).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..schema.errors import MedSynthError
from ..schema.grid import AxisOrder, LabelMap
from ..schema.labels import MODALITIES, Label, brain_mask
from .models import ModelCard

if TYPE_CHECKING:
    import torch

OUTPUT_NAMES = MODALITIES


@dataclass
class SynthesisResult:
    """Synthetic images of one label map."""

    labelmap: LabelMap
    images: dict[str, np.ndarray]  # modality -> (k, j, i) float32 scanner units
    normalized: np.ndarray  # (4, k, j, i) network output in [-1, 1]
    provenance: dict[str, Any] = field(default_factory=dict)


class SynthesisEngine:
    """A loaded model on a device: synthesises whole label maps and re-renders edited regions."""

    def __init__(self, model: ModelCard, device: str = "auto", precision: str = "auto",
                 log: Callable[[str], None] = lambda message: None, *, mirror_average: bool = True,
                 appearance_spread: float = 1.0) -> None:
        """Load ``model`` onto a device.

        Args:
            model: a synthesis model (an inpainting model is refused).
            device, precision: where and how the network runs (``auto``: the fastest available).
            log: receives one-line notices (fallbacks).
            mirror_average: average the network's pass with its pass on the left-right mirrored label map (one
                more forward pass; held-out gain: model card, "The mirror average").
            appearance_spread: how far a seed's appearance code reaches from the mean appearance
                (:meth:`~.appearance.AppearancePrior.code`, up to the model's
                :func:`~.appearance.spread_limit`): 1 draws from the training cases' distribution, 0 gives every
                seed the mean appearance.
        """
        import torch

        from .inference import Synthesizer, pick_device, pick_precision
        from .models import load_generator

        start = time.perf_counter()
        self.model = model
        self.network = model.network
        if self.network.kind == "inpainting":
            from ..schema.errors import InputError

            raise InputError(model.path, f"model {model.name} is an inpainting model: it re-renders a region of a "
                                         "real case (give --context CASE_DIR), it cannot synthesise a whole case")
        self.appearance_spread = appearance_spread  # checked against the model's limit before its weights load
        dev = pick_device(device)
        self.synth = Synthesizer(load_generator(model, "cpu"), self.network, dev, pick_precision(precision, dev),
                                 log=log, mirror_average=mirror_average)
        if self.synth.precision == "bf16" and dev.type == "cpu" and self.network.kind == "unet":
            # This engine owns its generator: hold the weights in bf16.  Under autocast alone every call
            # converts them again; the outputs are the same bit for bit (tested).  Measured on 2 loaded
            # cores, 124 x 112 x 126 box: 0-20 % less CPU per forward.
            self.synth.generator.to(torch.bfloat16)
        self.load_seconds = time.perf_counter() - start
        self._torch = torch

    @property
    def device(self) -> str:
        return str(self.synth.device)

    @property
    def appearance_spread(self) -> float:
        """How far a seed's code reaches from the mean appearance (set it between syntheses; checked)."""
        return self._appearance_spread

    @appearance_spread.setter
    def appearance_spread(self, value: float) -> None:
        from .appearance import check_model_spread

        self._appearance_spread = check_model_spread(value, self.model)

    @property
    def seed_effective(self) -> bool:
        """Whether the seed changes the image: only networks with an appearance code (``style_dim``) use it, and
        not at appearance spread 0."""
        return self.network.has_style and self.appearance_spread > 0

    def _use_axis_order(self, labelmap: LabelMap) -> None:
        """Run the network in its training axis order on ``labelmap``'s grid (and on the re-renders that follow)."""
        self.synth.axis_order = AxisOrder.from_grid(labelmap.grid)

    def appearance_code(self, seed: int) -> "torch.Tensor | None":
        """The (1, style_dim) appearance code ``seed`` stands for (``None`` for models without one).

        Drawn from the model's recorded appearance prior (the training codes' distribution,
        :mod:`.appearance`); a model without the record draws a standard normal.  Either draw is scaled by the
        engine's appearance spread.
        """
        from .networks import style_code

        if not self.network.has_style:
            return None
        if self.model.appearance is not None:
            return self.model.appearance.code(seed, self.appearance_spread)
        return self.appearance_spread * style_code(seed, self.network.style_dim)

    def _use_seed(self, seed: int) -> None:
        self.synth.style = self.appearance_code(seed)

    def synthesize(self, labelmap: LabelMap, seed: int = 0) -> SynthesisResult:
        """Synthesise the four images of a label map.

        Args:
            labelmap: the label map.
            seed: draws the appearance code of models that have one (the same seed gives the same
                image; another seed another plausible appearance).  Models without one ignore it,
                and the provenance says so (``seed_effective: false``).
        """
        from ..schema.provenance import privacy_of
        from .case_folder import case_provenance
        from .inference import to_scanner_units

        if not brain_mask(labelmap.array).any():
            raise MedSynthError("empty brain: the label map has no brain voxels")
        self._torch.manual_seed(seed)
        self._use_seed(seed)
        self._use_axis_order(labelmap)
        start = time.perf_counter()
        self.synth.take_passes()  # passes of earlier work (a preview's re-renders) are not this case's
        normalized = self.synth.predict(labelmap.array)
        passes = self.synth.take_passes()
        network_seconds = time.perf_counter() - start
        images = to_scanner_units(normalized, labelmap.array, self.model.normalizers, self.model.modalities)
        provenance = case_provenance(self.model, labelmap, privacy_of(labelmap), seed=seed, device=self.device,
                                     precision=self.synth.precision)
        provenance["seed_effective"] = self.seed_effective
        provenance["mirror_average"] = self.synth.mirror_average
        provenance["inference"] = passes  # sliding windows (an out-of-memory fallback) give other images
        if self.synth.style is not None:  # the exact code: the case can be made again from its record
            provenance["appearance_code"] = [float(v) for v in self.synth.style[0]]
            provenance["appearance_spread"] = self.appearance_spread
        provenance["timings_s"] = {"load_model": round(self.load_seconds, 3), "network": round(network_seconds, 3),
                                   "total": round(time.perf_counter() - start + self.load_seconds, 3)}
        return SynthesisResult(labelmap, images, normalized, provenance)

    def rerender(self, previous: SynthesisResult, edited: LabelMap, margin: int = 24) -> SynthesisResult:
        """Re-synthesise only the region an edit can affect and blend it into ``previous``.

        The region is the bounding box of the voxels whose label changed, grown by
        ``margin`` voxels on each side; inside the changed box plus half the margin
        the new output is used as is, and over the outer half it is feathered
        linearly into the previous result so no seam shows.
        """
        from ..schema.grid import mask_box
        from ..schema.provenance import array_sha256, privacy_of
        from .inference import brain_box

        if edited.grid != previous.labelmap.grid:
            raise MedSynthError("the edited label map is not on the previous result's grid")
        start = time.perf_counter()
        self._use_seed(int(previous.provenance.get("seed", 0)))  # the edited case keeps its appearance
        self._use_axis_order(edited)
        changed = edited.array != previous.labelmap.array
        normalized = previous.normalized.copy()
        images = {m: array.copy() for m, array in previous.images.items()}
        if changed.any():
            found = mask_box(changed)
            self.rerender_box(normalized, images, edited.array, tuple(s.start for s in found),
                              tuple(s.stop for s in found), brain_box(edited.array), margin)
        rerendered = [dict(record, rerender=True) for record in self.synth.take_passes()]
        provenance = dict(previous.provenance, labels_sha256=array_sha256(edited.array), edits=edited.history,
                          privacy=privacy_of(edited).to_json())
        if rerendered:
            provenance["inference"] = [*previous.provenance.get("inference", []), *rerendered]
        provenance["timings_s"] = dict(previous.provenance.get("timings_s", {}),
                                       rerender=round(time.perf_counter() - start, 3))
        return SynthesisResult(edited, images, normalized, provenance)

    def rerender_box(self, normalized: np.ndarray, images: dict[str, np.ndarray], labels: np.ndarray,
                     changed_lo: tuple[int, int, int], changed_hi: tuple[int, int, int],
                     brain: tuple[slice, ...], margin: int = 24) -> tuple[slice, ...]:
        """Re-synthesise the region around a changed box and blend it into ``normalized`` and ``images`` in place.

        The one ROI re-render of MedSynth (:meth:`rerender` and the interactive preview of
        :mod:`.preview` both call it).  The region is the changed box ``[changed_lo, changed_hi)``
        grown by ``margin`` voxels on each side, kept inside the brain box and on the network's
        stride lattice; inside the changed box plus half the margin the new output is used as is,
        over the outer half it is feathered linearly into the previous output so no seam shows.

        Args:
            normalized: (4, k, j, i) network output of the previous label map (written in the region).
            images: modality -> (k, j, i) scanner-unit images (written in the region).
            labels: the edited label map.
            changed_lo, changed_hi: bounding box (k, j, i) of the voxels whose label changed.
            brain: the brain box of ``labels`` (``inference.brain_box``), where a full synthesis runs.
            margin: voxels of context around the changed box.

        Returns:
            The region written (slices in k, j, i).
        """
        from .inference import to_scanner_units

        self.synth.take_passes()  # from here on the passes are this region's (rerender() records them)
        multiple = self.network.size_multiple
        # synthesize() runs the network on the brain box, padded at its end to the size
        # multiple.  Keep the region inside that box and on the same stride lattice (start a
        # multiple away from the box start), so the U-Net's down-sampling sees the voxels in
        # the same phase as a full synthesis; another phase gives visibly different output.
        # Start and end are those of the network's (training) axis order: along a stored axis
        # that runs reversed in it, mirror the coordinates inside the brain box, align, mirror back.
        first = np.array([s.start for s in brain])
        last = np.array([s.stop for s in brain])
        reversed_axes = np.array(self.synth.axis_order.stored_flips)
        mirror = first + last
        want_lo = np.where(reversed_axes, mirror - np.asarray(changed_hi), np.asarray(changed_lo))
        want_hi = np.where(reversed_axes, mirror - np.asarray(changed_lo), np.asarray(changed_hi))
        lo = np.maximum(want_lo - margin, first)
        lo -= (lo - first) % multiple
        hi = np.minimum(want_hi + margin, last)
        hi = np.minimum(lo + -(-(hi - lo) // multiple) * multiple, last)
        lo, hi = np.where(reversed_axes, mirror - hi, lo), np.where(reversed_axes, mirror - lo, hi)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        region = self.synth.predict_region(labels, box, lattice=brain)
        # No feathering at faces on the brain box: the full synthesis has no context there either.
        weight = _feather(tuple(int(b - a) for a, b in zip(lo, hi)), lo - first, hi - first,
                          tuple(int(v) for v in last - first), margin // 2)
        channels = (slice(None),) + box
        # weight * new + (1 - weight) * previous, in place in the network's output (no box-sized temporaries
        # but one: at interactive rates their allocation costs as much as the arithmetic).
        blended = np.multiply(region, weight, out=region)
        blended += np.subtract(1, weight, out=weight) * normalized[channels]
        labels_box = labels[box]
        blended[:, labels_box == Label.BACKGROUND] = -1.0
        normalized[channels] = blended
        # Every changed voxel lies in the box, so only the box needs mapping back to scanner units.
        for modality, values in to_scanner_units(blended, labels_box, self.model.normalizers,
                                                 tuple(self.network.modalities)).items():
            images[modality][box] = values
        return box


def _feather(shape: tuple[int, int, int], lo: np.ndarray, hi: np.ndarray, full: tuple[int, ...],
             ramp: int) -> np.ndarray:
    """Blend weight: 1 inside, linear to 0 over ``ramp`` voxels at box faces inside the volume."""
    weight = np.ones(shape, np.float32)
    for axis in range(3):
        n = shape[axis]
        profile = np.ones(n, np.float32)
        if ramp > 0:
            ramp_values = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
            if lo[axis] > 0:
                profile[:min(ramp, n)] = ramp_values[:min(ramp, n)]
            if hi[axis] < full[axis]:
                profile[max(n - ramp, 0):] = np.minimum(profile[max(n - ramp, 0):], ramp_values[::-1][-min(ramp, n):])
        view = [1, 1, 1]
        view[axis] = n
        weight = weight * profile.reshape(view)
    return weight


def write_synthesis(result: SynthesisResult, out_dir: Path, *, overwrite: bool = False,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write the case folder (see :mod:`MedSynthLib.synthesis.case_folder`, the owner of its format)."""
    from .case_folder import write_case_folder

    return write_case_folder(result.labelmap, result.images, result.provenance, out_dir, overwrite=overwrite,
                             extra=extra)
