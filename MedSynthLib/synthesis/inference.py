"""Label map -> T1, T1ce, T2, FLAIR with a trained generator.

The network runs on the brain's bounding box only, padded to the U-Net's size
multiple with background and cropped back, so any grid works.  Whole-box
inference is used when it fits the memory budget, MONAI's sliding-window
inference with Gaussian blending otherwise; a GPU out-of-memory falls back to
smaller windows, then to the CPU, and says so.  Each pass records the path it took
(:attr:`Synthesizer.passes`, the provenance's ``inference``): the paths give different images.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch

from ..schema.errors import MedSynthError
from ..schema.grid import AxisOrder
from ..schema.labels import NUM_CLASSES, Label, brain_mask
from .networks import NetworkConfig, one_hot

if TYPE_CHECKING:
    from .normalize import Normalizer

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes CUDA, then MPS, then the CPU; a named device that is absent is an error."""
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if requested.startswith("cuda") and not cuda:
        raise MedSynthError(f"--device {requested}: CUDA is not available on this machine (torch {torch.__version__})")
    if requested == "mps" and not mps:
        raise MedSynthError("--device mps: Apple MPS is not available on this machine")
    if not (requested == "cpu" or requested == "mps" or requested.startswith("cuda")):
        raise MedSynthError(f"--device {requested}: unknown device (auto, cpu, cuda, mps)")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86: AVX512-BF16 or AMX; ARM: the BF16 extension).

    Elsewhere torch emulates bf16: on an AVX2-only CPU a 32-channel 3D convolution took 220x longer in
    bf16 than in fp32 (6.68 s vs 0.030 s, one thread), so bf16 is then no speed-up but a trap. The same holds
    where oneDNN's ISA is capped below bf16 (:func:`_onednn_cap_allows_bf16`).
    """
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(probe()) for probe in probes if probe is not None) and _onednn_cap_allows_bf16()
    if machine in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as handle:
                return any(line.lower().startswith("features") and " bf16" in f" {line.split(':', 1)[-1].lower()} "
                           for line in handle)
        except OSError:  # macOS: Apple silicon runs MedSynth on MPS; its CPU path stays fp32
            return False
    return False


# oneDNN ISA caps (its CPU dispatcher control) at or above the first ISA with bf16 instructions.
_BF16_ISA_CAPS = frozenset({"avx512_core_bf16", "avx512_core_fp16", "avx10_1_512", "avx512_core_amx",
                            "avx10_1_512_amx", "avx512_core_amx_fp16", "avx10_1_512_amx_fp16", "all"})
_ONEDNN_ISA_CAPS = _BF16_ISA_CAPS | {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core",
                                    "avx512_core_vnni"}


def _onednn_cap_allows_bf16() -> bool:
    """Whether oneDNN may use the CPU's bf16 instructions: ``ONEDNN_MAX_CPU_ISA`` (or its older name
    ``DNNL_MAX_CPU_ISA``) caps the ISA its kernels use, and a cap below AVX512_CORE_BF16 makes bf16 emulated even
    on a CPU with AMX. A value oneDNN does not know is ignored by it, and here."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    return cap not in _ONEDNN_ISA_CAPS or cap in _BF16_ISA_CAPS


def pick_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it (fp16 on other GPUs), bf16 on CPUs that compute it natively,
    fp32 on other CPUs (:func:`cpu_has_native_bf16`)."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        return "fp16"
    if requested not in PRECISIONS:
        raise MedSynthError(f"--precision {requested}: choose from auto, {', '.join(PRECISIONS)}")
    if requested == "fp16" and device.type == "cpu":
        raise MedSynthError("--precision fp16 is not supported on the CPU (use bf16 or fp32)")
    return requested


def emulated_bf16_notice(precision: str, device: torch.device) -> str | None:
    """The one-line notice for bf16 on a CPU that does not compute it natively (:func:`cpu_has_native_bf16`),
    else ``None``.

    ``auto`` takes fp32 there, so bf16 on such a CPU was asked for by name: it is kept (an explicit choice is
    not overridden), but the user is told, since torch then emulates bf16 (measured on an AVX2-only AMD EPYC:
    the network 28x slower than in fp32, 81 s against 2.5-3 s).
    """
    if precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return None
    return ("precision bf16: this CPU has no native bf16 (AVX512-BF16, AMX or ARM BF16), so bf16 is emulated and "
            f"runs many times slower than fp32; precision auto would pick {pick_precision('auto', device)} here. "
            "Running in bf16 as asked")


def brain_box(labels: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    from ..schema.grid import mask_box

    brain = brain_mask(labels)
    if not brain.any():
        raise MedSynthError("empty brain: the label map has no brain voxels")
    return mask_box(brain, margin)


@dataclass
class Synthesizer:
    """Runs a generator on label maps.

    Attributes:
        generator: the network (``[-1, 1]`` outputs).
        network: its architecture (for the size multiple).
        device: where it runs.
        precision: fp32, bf16 or fp16.
        max_voxels: largest padded box run in one piece; bigger boxes use sliding windows.
        roi: sliding-window size.
        log: receives one-line notices (fallbacks; bf16 emulated on this CPU, :func:`emulated_bf16_notice`,
            once, when the synthesizer is made).
        style: (1, style_dim) appearance code for networks that take one (``None``: the prior's mean).
        axis_order: how the label maps given are stored (:class:`AxisOrder`); the network runs in its training order.
        mirror_average: average each output with the network's pass on the left-right mirrored label map, mirrored
            back (the models train with left-right flips; one more forward pass; held-out gain: model card,
            "The mirror average").
        passes: how each network pass since the last :meth:`take_passes` ran (the provenance's
            :class:`~MedSynthLib.schema.provenance.InferencePass` records, in order).
    """

    generator: torch.nn.Module
    network: NetworkConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    max_voxels: int = 8_000_000
    roi: int = 128
    log: Callable[[str], None] = lambda message: None
    style: torch.Tensor | None = None
    axis_order: AxisOrder = field(default_factory=AxisOrder)
    mirror_average: bool = False
    passes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        notice = emulated_bf16_notice(self.precision, self.device)
        if notice is not None:
            self.log(notice)

    def _forward(self, onehot: torch.Tensor) -> torch.Tensor:
        if self.style is None or not self.network.has_style:
            return self.generator(onehot)
        return self.generator(onehot, style=self.style.to(onehot.device))

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the network's input is built in for this precision (float32 for fp32)."""
        return _DTYPES.get(self.precision, torch.float32)

    @staticmethod
    def memory_format(tensor: torch.Tensor) -> torch.memory_format:
        """Channels-last for 3D (and 2D) inputs: oneDNN's and cuDNN's fast convolution layout.

        Measured on a 2-core CPU, bf16, brain box 144 x 176 x 144: 1.4 s -> 1.0 s per forward.
        """
        return {5: torch.channels_last_3d, 4: torch.channels_last}.get(tensor.dim(), torch.contiguous_format)

    def take_passes(self) -> list[dict[str, Any]]:
        """The records of the passes run since the last call (:attr:`passes`), which starts empty again."""
        passes, self.passes = self.passes, []
        return passes

    def _windows(self, onehot: torch.Tensor, roi: int) -> tuple[tuple[int, ...], float]:
        """The sliding window's size and overlap for ``roi`` on this input."""
        # A window larger than the input would make MONAI pad it with zeros, and an all-zero
        # one-hot voxel is no label at all (not background): keep windows inside the input,
        # which predict() has already padded to the size multiple with background.
        roi_size = tuple(min(roi, int(s)) for s in onehot.shape[2:])
        # Window steps must be multiples of the network's size step, or neighbouring windows
        # see different pooling grids: 0.25 overlap of 128 steps 96, otherwise use 0.5.
        multiple = self.network.size_multiple
        overlap = 0.25 if all((r - r * 3 // 4) % multiple == 0 and (r * 3 // 4) % multiple == 0
                              for r in roi_size) else 0.5
        return roi_size, overlap

    def _run(self, onehot: torch.Tensor, roi: int | None, keep_layout: bool = False) -> torch.Tensor:
        layout = self.memory_format(onehot)
        self.generator.to(memory_format=layout)
        onehot = onehot.contiguous(memory_format=layout)
        with torch.inference_mode(), self._autocast():
            if roi is None:
                output = self._forward(onehot)
                return output if keep_layout else output.float().contiguous()
            from monai.inferers import sliding_window_inference

            roi_size, overlap = self._windows(onehot, roi)
            return sliding_window_inference(onehot, roi_size, sw_batch_size=1,
                                            predictor=lambda x: self._forward(x).float(), overlap=overlap,
                                            mode="gaussian").float().contiguous()

    def predict(self, labels: np.ndarray, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """Normalised images (4, *labels.shape) in ``[-1, 1]``; -1 outside the brain.

        Args:
            labels: (k, j, i) MedSynth label map.
            box: region to run on (default: the brain's bounding box).
        """
        box = box or brain_box(labels)
        region = self.predict_region(labels, box)  # before allocating the output: a lower peak
        out = np.full((self.network.out_channels,) + labels.shape, -1.0, np.float32)
        out[(slice(None),) + box] = region
        return out

    def predict_region(self, labels: np.ndarray, box: tuple[slice, ...],
                       lattice: tuple[slice, ...] | None = None) -> np.ndarray:
        """Normalised images (4, *box size) of ``labels[box]``; -1 on background.

        Only the box is run, in the training axis order (:attr:`axis_order`; padded at its end in that order
        to the size multiple with background), and only box-sized arrays are allocated.

        Args:
            lattice: the box a full synthesis runs on (:func:`brain_box`) when ``box`` is a part of it (a
                re-render): the mirror average's mirrored pass is aligned to the down-sampling grid the full
                synthesis' mirrored pass has, as the direct pass is by the caller.  Default: ``box`` itself.
        """
        crop = labels[box] if self.axis_order.is_identity else np.ascontiguousarray(
            self.axis_order.to_training(labels[box]))
        result = self._predict_crop(crop, part="direct")
        if self.mirror_average:
            # In the training order (LPS) the last axis is left-right.  Mirrored, the full box's far end is where
            # its down-sampling grid starts: pad the mirrored crop in front so that it keeps that grid's phase.
            front = 0
            if lattice is not None:
                axis, reversed_axis = self.axis_order.perm[2], self.axis_order.flip[2]
                gap = box[axis].start - lattice[axis].start if reversed_axis else lattice[axis].stop - box[axis].stop
                front = gap % self.network.size_multiple
            mirrored = self._predict_crop(np.ascontiguousarray(crop[..., ::-1]), front, part="mirrored")
            result += mirrored[..., ::-1]
            result *= 0.5
        result[:, crop == Label.BACKGROUND] = -1.0
        return result if self.axis_order.is_identity else np.ascontiguousarray(self.axis_order.to_stored(result))

    def _predict_crop(self, crop: np.ndarray, front: int = 0, part: str | None = None) -> np.ndarray:
        """The network's (4, *crop size) output on a crop in the training order, padded with background at its
        end to the size multiple (and by ``front`` voxels before its last axis) and cropped back (float32; a
        view of the padded output)."""
        multiple = self.network.size_multiple
        pads = [(0, (-s) % multiple) for s in crop.shape[:2]] + [(front, (-(crop.shape[2] + front)) % multiple)]
        padded = np.pad(crop, pads, constant_values=Label.BACKGROUND)
        onehot = one_hot(torch.from_numpy(padded)[None], NUM_CLASSES, dtype=self.input_dtype,
                         channels_last=True)
        result = self._predict_with_fallback(onehot, part=part)
        return result[0, :, : crop.shape[0], : crop.shape[1], front: front + crop.shape[2]].cpu().numpy()

    def predict_condition(self, condition: torch.Tensor, keep_layout: bool = False) -> torch.Tensor:
        """The network on a prepared (B, C, *spatial) condition whose sizes are multiples of the network's
        (an inpainting model's label map + blanked images + mask), with the same fallbacks as :meth:`predict`.

        Args:
            keep_layout: return the output as the network gives it, in its memory layout (channels-last on a
                CPU) and precision, instead of a float32 copy in the standard layout: for a caller that reads a
                few of its voxels.
        """
        return self._predict_with_fallback(condition, keep_layout)

    def _predict_with_fallback(self, onehot: torch.Tensor, keep_layout: bool = False,
                               part: str | None = None) -> torch.Tensor:
        roi: int | None = None if onehot[0, 0].numel() <= self.max_voxels else self.roi
        retries = 0
        while True:
            try:
                self.generator.to(self.device)
                output = self._run(onehot.to(self.device), roi, keep_layout)
                self.passes.append(self._pass_record(onehot, roi, part, retries))
                return output
            except torch.cuda.OutOfMemoryError:
                retries += 1
                torch.cuda.empty_cache()
                smaller = self.roi if roi is None else roi // 2
                if smaller >= max(32, self.network.size_multiple) and smaller % self.network.size_multiple == 0:
                    self.log(f"GPU out of memory: retrying with {smaller}^3 sliding windows")
                    roi = smaller
                    continue
                if self.device.type == "cpu":
                    raise  # the CPU with the smallest windows: nothing is left to fall back to
                self.log("GPU out of memory even with small windows: falling back to the CPU")
                self.device = torch.device("cpu")
                self.precision = pick_precision("auto", self.device)
                roi = None if onehot[0, 0].numel() <= self.max_voxels else self.roi

    def _pass_record(self, onehot: torch.Tensor, roi: int | None, part: str | None, retries: int) -> dict[str, Any]:
        """The provenance record (:class:`~MedSynthLib.schema.provenance.InferencePass`) of a pass that ran."""
        record: dict[str, Any] = {"part": part, "method": "whole-volume"}
        if roi is not None:
            window, overlap = self._windows(onehot, roi)
            record.update(method="sliding-window", window=list(window), overlap=overlap, blending="gaussian")
        record.update(device=str(self.device), precision=self.precision, out_of_memory_retries=retries)
        return {key: value for key, value in record.items() if value is not None}


def to_scanner_units(normalized: np.ndarray, labels: np.ndarray,
                     normalizers: "Mapping[str, Normalizer | dict[str, Any]]",
                     modalities: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Map ``[-1, 1]`` outputs back to the training data's intensity ranges; 0 outside the brain.

    Args:
        normalizers: per modality, a normaliser (a model card's ``normalizers``, built once) or its
            JSON form (a model config's ``intensity`` entry).
    """
    from ..schema.grid import mask_box
    from .normalize import normalizer_from_json

    brain = brain_mask(labels)
    if not brain.any():
        return {m: np.zeros(labels.shape, np.float32) for m in modalities}
    box = mask_box(brain)  # outside it every voxel is background: 0
    out = {}
    for c, m in enumerate(modalities):
        normalizer = normalizers[m]
        if isinstance(normalizer, dict):
            normalizer = normalizer_from_json(normalizer)
        image = np.zeros(labels.shape, np.float32)
        image[box] = normalizer.inverse(normalized[c][box], brain[box])
        out[m] = image
    return out
