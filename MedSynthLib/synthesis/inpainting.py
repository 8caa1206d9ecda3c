"""Tumour inpainting: re-render only the edited region of a real patient's scan (``network.kind: inpainting``).

The network is the SPADE generator of :mod:`~MedSynthLib.synthesis.spade_generator`
(MONAI blocks for training, the plain-torch twin of
:mod:`~MedSynthLib.synthesis.inference_spade` for inference) whose condition is
not the label map alone but, channel by channel:

* the one-hot 7-class label map (the edited one),
* the four real contrasts, z-scored against the case's own grey and white matter
  (``tissue_zscore``, :mod:`~MedSynthLib.synthesis.normalize`) with the region
  blanked (set to 0, the grey/white mean),
* the region mask.

Its four outputs are used only inside the region and feathered towards the real
image near the region's border, with a weight that is 0 outside the region, so every
voxel outside it is the real scan as stored, bit for bit.  The region is the changed
tumour (old and new position) grown by a margin in mm: oedema and mass effect reach
beyond the label.  Intensities go back to the case's own scanner scale with the
case's own normaliser, so the painted region matches the patient's contrast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..schema.errors import InputError, MedSynthError
from ..schema.labels import MODALITIES, NUM_CLASSES, Label, brain_mask, tumour_mask

#: Value of the blanked region in the normalised images: z = 0, the case's grey/white-matter mean.
BLANK_VALUE = 0.0
#: Default growth of the changed tumour into the region (mm): oedema and mass effect beyond the label.
DEFAULT_MARGIN_MM = 8.0
#: Width of the feathered band inside the region's border (mm).
DEFAULT_FEATHER_MM = 3.0
#: Context around the region that the network sees in training validation (voxels on each side of its box).
CONTEXT_VOXELS = 16
#: Least context around the region at inference (voxels on each side of its box): the box then grows to the
#: network's size multiple with real context (not background padding), so a typical region costs about
#: two-thirds of the network time that 16 voxels padded to the multiple cost.
INFERENCE_CONTEXT_VOXELS = 8
#: Least voxels of a healthy class inside and outside the region (on its 2-voxel lattice) for
#: :func:`match_tissue_medians` to shift it.
MIN_TISSUE_VOXELS = 20
#: Width of the shell around the region whose real tissue :func:`match_tissue_medians` matches (voxels).
TISSUE_SHELL_VOXELS = 10.0
NORMALIZATION = "tissue_zscore"
INPUT_CHANNELS = NUM_CLASSES + len(MODALITIES) + 1
#: Largest crop (voxels) whose mirror average runs as one batch of two; a larger one runs two passes, so the
#: batch never holds more activations than one pass of a crop twice this size (a typical preview region's
#: crop: 112^3 = 1.4 M voxels).
MIRROR_BATCH_MAX_VOXELS = 2_000_000
MASK_FILE = "synthetic_mask.nii.gz"


def inpainting_condition(onehot: Any, images: Any, region: Any) -> Any:
    """The network's input: (one-hot labels, images with the region blanked, region mask) along channels.

    Args:
        onehot: (B, 7, *spatial) one-hot label map (torch).
        images: (B, 4, *spatial) normalised real images in ``[-1, 1]``.
        region: (B, 1, *spatial) region mask, 1 inside (float).
    """
    import torch

    region = region.to(images.dtype)
    blanked = images * (1 - region) + BLANK_VALUE * region
    return torch.cat([onehot.to(images.dtype), blanked, region], 1)


def channels_last_condition(labels: np.ndarray, images: np.ndarray, region: np.ndarray, dtype: Any,
                            multiple: int = 1, mirrored: bool = False) -> Any:
    """:func:`inpainting_condition` of one case, built in place in the channels-last layout of inference.

    The same values as the concatenation, without its float32 copies (on a 2-core CPU the concatenation
    and the layout change cost as much as the network on a typical region).  With ``multiple`` each size is
    padded at its end to a multiple of it as the network needs (background labels, images -1, outside the
    region), written straight into the condition instead of padding every input first.

    Args:
        labels: (*spatial) label map; images: (4, *spatial) normalised; region: (*spatial) bool.
        mirrored: return a batch of two, the condition and the condition of the crop mirrored along its last
            axis (each padded at its end), for :meth:`InpaintingEngine.predict_normalized`'s mirror average.
    """
    import torch

    shape = tuple(int(n) for n in labels.shape)
    padded = tuple(n + (-n) % multiple for n in shape)
    out = torch.empty((2 if mirrored else 1,) + padded + (INPUT_CHANNELS,), dtype=dtype)
    _fill_condition(out[0], labels, images, region, shape, padded)
    if mirrored:
        if padded == shape:  # the mirrored crop's condition is the condition mirrored: one copy, not a rebuild
            out[1].copy_(out[0].flip(-2))
        else:  # the padding stays at the end of the mirrored crop
            _fill_condition(out[1], labels[..., ::-1], images[..., ::-1], region[..., ::-1], shape, padded)
    return out.movedim(-1, 1)  # (B, C, *spatial), channels-last in memory


def _fill_condition(out: Any, labels: np.ndarray, images: np.ndarray, region: np.ndarray,
                    shape: tuple[int, ...], padded: tuple[int, ...]) -> None:
    """Write one case's condition into ``out`` (*padded, channels)."""
    import torch

    inside = tuple(slice(0, n) for n in shape)
    labels_t = torch.full(padded, int(Label.BACKGROUND), dtype=torch.uint8)
    labels_t[inside] = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))
    region_t = torch.zeros(padded, dtype=torch.bool)
    region_t[inside] = torch.from_numpy(np.ascontiguousarray(region, dtype=bool))
    out[..., :NUM_CLASSES] = labels_t.unsqueeze(-1) == torch.arange(NUM_CLASSES, dtype=torch.uint8)
    blanked = out[..., NUM_CLASSES:NUM_CLASSES + len(MODALITIES)]
    if padded != shape:
        blanked.fill_(-1.0)
    blanked[inside] = torch.from_numpy(np.ascontiguousarray(images)).movedim(0, -1)
    blanked.masked_fill_(region_t.unsqueeze(-1), BLANK_VALUE)
    out[..., -1] = region_t


def lattice_box(region: np.ndarray, multiple: int, min_context: int = INFERENCE_CONTEXT_VOXELS) -> tuple[slice, ...]:
    """The network's input box for ``region``: its bounding box with at least ``min_context`` voxels on each
    side, each size grown to a multiple of ``multiple`` with more of the real image around it (centred,
    shifted inside the volume); only a volume smaller than that keeps its whole extent (padded later).
    """
    from ..schema.grid import mask_box

    tight = mask_box(region, 0)
    box = []
    for s, n in zip(tight, region.shape):
        size = min(-(-(s.stop - s.start + 2 * min_context) // multiple) * multiple, int(n))
        start = s.start - (size - (s.stop - s.start)) // 2
        start = max(0, min(start, int(n) - size))
        box.append(slice(start, start + size))
    return tuple(box)


def _ball_growth(core: np.ndarray, margin_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxels within ``margin_mm`` of ``core`` (exact Euclidean distance, computed on the core's box only)."""
    from scipy import ndimage

    from ..schema.grid import mask_box

    if not core.any():
        return core.copy()
    reach = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]
    box = mask_box(core, 0)
    box = tuple(slice(max(b.start - r, 0), min(b.stop + r, n)) for b, r, n in zip(box, reach, core.shape))
    distance = ndimage.distance_transform_edt(~core[box], sampling=spacing)
    grown = np.zeros_like(core)
    grown[box] = distance <= margin_mm
    return grown


def changed_region(new_labels: np.ndarray, old_tumour: np.ndarray | None, margin_mm: float,
                   spacing: tuple[float, float, float], old_labels: np.ndarray | None = None) -> np.ndarray:
    """The voxels to re-render: the changed tumour (old and new position) grown by ``margin_mm``, in the brain.

    Args:
        new_labels: the edited MedSynth label map.
        old_tumour: boolean tumour mask before the edit (the case's own segmentation, or the old label map's);
            ``None``: no old tumour.
        margin_mm: growth beyond the tumours.
        spacing: voxel spacing (k, j, i) in mm.
        old_labels: the whole label map before the edit, when known: voxels whose class changed (a
            tumour class changed in place, an anatomy stroke) are re-rendered too.  Without it the old and
            new tumours are re-rendered whenever they differ.
    """
    new_tumour = tumour_mask(new_labels)
    old = old_tumour if old_tumour is not None else np.zeros_like(new_tumour)
    if old_labels is not None:
        changed = old_labels != new_labels
        if not changed.any():
            return np.zeros_like(new_tumour)
        core = changed | ((old | new_tumour) if (changed & (old | new_tumour)).any() else changed)
    else:
        if np.array_equal(old, new_tumour):
            core = new_tumour.copy()  # no old map: re-render the tumour in place (e.g. new sub-labels)
        else:
            core = old | new_tumour
    return _ball_growth(core, margin_mm, spacing) & brain_mask(new_labels)


def feather_weight(region: np.ndarray, spacing: tuple[float, float, float],
                   feather_mm: float = DEFAULT_FEATHER_MM) -> np.ndarray:
    """Blend weight of the synthetic image: 0 outside the region, rising to 1 over ``feather_mm`` inside it.

    The ramp counts the erosions (6-connected) a voxel survives, one per voxel of the finest spacing:
    n erosions give weights 1/(n+1) at the border ... 1 deep inside.  Erosions cost a fraction of a
    distance transform on the region's box, and only the ramp's few voxels need the distance.
    """
    from scipy import ndimage

    from ..schema.grid import mask_box

    weight = np.zeros(region.shape, np.float32)
    if not region.any():
        return weight
    steps = int(np.ceil(feather_mm / min(spacing))) if feather_mm > 0 else 0
    box = mask_box(region, 1)
    level = region[box].astype(np.float32)
    eroded = region[box]
    for _ in range(steps):
        eroded = ndimage.binary_erosion(eroded)
        level += eroded
    weight[box] = level / (steps + 1)
    return weight


@dataclass
class ContextCase:
    """A real case as context: its four contrasts exactly as stored, and its own tumour."""

    folder: Path
    images: dict[str, np.ndarray]  # modality -> (k, j, i) in the stored type
    tumour: np.ndarray | None  # schema tumour labels (0 or NCR/ED/ET), or None without a segmentation
    files: dict[str, Path]


def read_context(case_dir: str | Path, labelmap: Any) -> ContextCase:
    """Read a real case folder as context for ``labelmap``; every volume must be on the label map's grid.

    Raises:
        InputError: a missing modality or a grid that differs from the label map's (naming the file).
    """
    import SimpleITK as sitk

    from ..cases.readers import read_case

    case = read_case(case_dir)  # refuses a missing modality and volumes on different grids, naming the file
    difference = labelmap.grid.difference(case.grid)
    if difference is not None:
        raise InputError(case.files.get("t1", Path(case_dir)), f"not on the label map's grid: {difference}")
    images = {}
    for modality in MODALITIES:
        path = case.files[modality]
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        stored = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype
        values = case.images[modality]
        images[modality] = values.astype(stored) if np.array_equal(values, values.astype(stored)) else values
    return ContextCase(Path(case_dir), images, case.tumour, dict(case.files))


def case_normalizers(images: dict[str, np.ndarray], labels: np.ndarray, exclude: np.ndarray) -> dict[str, Any]:
    """Each contrast's ``tissue_zscore`` normaliser from the case's own grey and white matter outside ``exclude``."""
    from .normalize import HealthyTissueZScore

    reference = (labels >= Label.GM) & (labels <= Label.WM) & ~exclude
    if not reference.any():
        raise MedSynthError("the label map has no grey or white matter outside the region to normalise against")
    return {m: HealthyTissueZScore.fit(images[m], reference, NORMALIZATION) for m in MODALITIES}


def match_tissue_medians(predicted: np.ndarray, labels: np.ndarray, normalized: np.ndarray, region: np.ndarray,
                         shell_voxels: float = TISSUE_SHELL_VOXELS) -> np.ndarray:
    """``predicted`` with each healthy class (CSF, GM, WM) inside ``region`` shifted, per contrast, so that its
    median is the real image's median of the same class in a shell around ``region``.

    The network sees the patient's tissue only around the region; this carries the patient's local brightness of
    each tissue into it (bias field, scanner contrast).  The shell must be local: matching to the whole crop
    outside the region (8-16 voxels and more) scored a lower region SSIM than the 10-voxel shell on 7 of 7
    held-out cases, and lower than no shift on 3 of them.  Tumour classes are left as predicted (the real image
    has no reference for them outside the region), and so is a class with fewer than :data:`MIN_TISSUE_VOXELS`
    voxels on either side.  The real values inside ``region`` are never read.

    Args:
        predicted: (4, k, j, i) network output; labels: (k, j, i) label map; normalized: (4, k, j, i) the real
            images, normalised as the network's input; region: (k, j, i) bool; shell_voxels: the shell's width
            (Euclidean distance from the region in voxels, within the crop, measured between the voxels of
            the 2-voxel lattice).
    """
    out = np.array(predicted, dtype=np.float32, copy=True)
    # Medians from every second voxel along each axis: the same statistics at an eighth of the cost (a 1.6 M-voxel
    # crop: 0.2 s at full resolution, mostly the distance transform).  Distances are in full-resolution voxels.
    lattice = (slice(None, None, 2),) * 3
    region_sub, labels_sub = region[lattice], labels[lattice]
    shell = _ball_growth(region_sub, shell_voxels, (2.0, 2.0, 2.0)) & ~region_sub
    predicted_sub, real_sub = np.asarray(predicted)[(slice(None),) + lattice], normalized[(slice(None),) + lattice]
    for value in (Label.CSF, Label.GM, Label.WM):
        of_class = labels_sub == value
        inside, around = region_sub & of_class, shell & of_class
        if inside.sum() < MIN_TISSUE_VOXELS or around.sum() < MIN_TISSUE_VOXELS:
            continue
        shift = np.median(real_sub[:, around], axis=1) - np.median(predicted_sub[:, inside], axis=1)
        out[:, region & (labels == value)] += shift[:, None].astype(np.float32)
    return out


@dataclass
class InpaintResult:
    """Images of a real case with one region re-rendered."""

    images: dict[str, np.ndarray]  # modality -> stored type of the context
    region: np.ndarray  # bool: voxels that are (partly) synthetic
    timings_s: dict[str, float] = field(default_factory=dict)


class InpaintingEngine:
    """A loaded inpainting model on a device."""

    def __init__(self, model: Any, device: str = "auto", precision: str = "auto",
                 log: Callable[[str], None] = lambda message: None, *, mirror_average: bool = True,
                 match_tissue: bool = True) -> None:
        """Load ``model`` on ``device``.

        Args:
            mirror_average: average the forward pass with the left-right mirrored one (the models train with
                left-right flips); costs a second forward pass.
            match_tissue: shift each healthy class in the region to the patient's own median of that class
                around it (:func:`match_tissue_medians`).

        Both options are on by default: on the 9 held-out real cases of its fold they raised the registered
        model's region SSIM from 0.444 to 0.461 (docs/inpainting.md, ``benchmarks/inpainting_inference_ab.py``).
        """
        from .inference import Synthesizer, pick_device, pick_precision
        from .models import load_generator
        from .networks import NetworkConfig

        start = time.perf_counter()
        self.network = NetworkConfig.from_json(model.config["network"])
        if self.network.kind != "inpainting":
            raise InputError(model.path, f"model {model.name} is a {self.network.kind} model, not an inpainting "
                                         "model (give --model an inpainting model)")
        self.model = model
        self.mirror_average = mirror_average
        self.match_tissue = match_tissue
        dev = pick_device(device)
        self.synth = Synthesizer(load_generator(model, "cpu"), self.network, dev, pick_precision(precision, dev),
                                 log=log)
        if self.synth.precision == "bf16" and dev.type == "cpu":
            # As the synthesis engine: weights held in bf16 instead of converted again under autocast in every
            # call; the outputs are the same bit for bit (tested).  Measured on 2 loaded cores, a 128 x 128 x 144
            # region: 0.99 -> 0.64 s of CPU per forward (median of 3).
            import torch

            self.synth.generator.to(torch.bfloat16)
        if self.network.spatial_dims == 3:  # the layout of every forward, converted once here, not in the first one
            import torch

            self.synth.generator.to(memory_format=torch.channels_last_3d)
        self.load_seconds = time.perf_counter() - start

    def predict_normalized(self, labels: np.ndarray, normalized: np.ndarray, region: np.ndarray) -> np.ndarray:
        """The re-rendered crop (4, *labels.shape) in ``[-1, 1]``: the network's output for the crop with ``region``
        blanked, mirror-averaged and tissue-matched as the engine's options say.

        Args:
            labels: (k, j, i) label map of the crop; normalized: (4, k, j, i) its normalised images (the values
                inside ``region`` are never read); region: (k, j, i) bool, the voxels to re-render.
        """
        if self.mirror_average and labels.size <= MIRROR_BATCH_MAX_VOXELS:
            # One batch of the crop and its mirror image instead of two passes: measured on 2 idle AVX2 cores, a
            # 112^3 crop, 0.55 s instead of 2 x 0.37 s; each output within 3e-7 of its pass alone.
            condition = channels_last_condition(labels, normalized, region, self.synth.input_dtype,
                                                self.network.size_multiple, mirrored=True)
            both = self._forward_condition(condition, labels.shape)
            predicted = 0.5 * (both[0] + both[1][..., ::-1])
        elif self.mirror_average:  # a large crop: two passes keep the peak memory of one
            mirrored = self.forward_normalized(np.ascontiguousarray(labels[..., ::-1]),
                                               np.ascontiguousarray(normalized[..., ::-1]),
                                               np.ascontiguousarray(region[..., ::-1]))
            predicted = 0.5 * (self.forward_normalized(labels, normalized, region) + mirrored[..., ::-1])
        else:
            predicted = self.forward_normalized(labels, normalized, region)
        if self.match_tissue:
            predicted = match_tissue_medians(predicted, labels, normalized, region)
        return predicted

    def forward_normalized(self, labels: np.ndarray, normalized: np.ndarray, region: np.ndarray) -> np.ndarray:
        """One forward pass of the network: (4, *labels.shape) in ``[-1, 1]`` for a crop with ``region`` blanked.

        Args:
            labels: (k, j, i) label map of the crop; normalized: (4, k, j, i) its normalised images;
            region: (k, j, i) bool, the voxels to re-render.  Only crop-sized arrays are allocated.
        """
        condition = channels_last_condition(labels, normalized, region, self.synth.input_dtype,
                                            self.network.size_multiple)
        return self._forward_condition(condition, labels.shape)[0]

    def _forward_condition(self, condition: Any, shape: tuple[int, ...]) -> np.ndarray:
        """The network on a batch of conditions: (B, 4, *shape), the padding cropped off."""
        out = self.synth.predict_condition(condition)
        return out[:, :, : shape[0], : shape[1], : shape[2]].cpu().numpy()

    def inpaint_box(self, labels: np.ndarray, images: dict[str, np.ndarray], region: np.ndarray,
                    spacing: tuple[float, float, float], feather_mm: float = DEFAULT_FEATHER_MM,
                    check: Callable[[], None] | None = None) -> tuple[tuple[slice, ...], dict[str, np.ndarray], float]:
        """Re-render ``region`` within its box: (box, modality -> the box of the image, network seconds).

        The box is :func:`lattice_box` (the region with at least :data:`INFERENCE_CONTEXT_VOXELS` of context,
        on the network's size multiple); outside ``region`` its values are the input's.  ``images`` is not
        modified.  ``check`` (the preview's stop callback) is called between the stages before the network and
        stops the call by raising (the network itself is stopped between layers by the caller's hooks).

        Raises:
            MedSynthError: ``region`` is empty, or no grey/white matter is left to normalise against.
        """
        if not region.any():
            raise MedSynthError("the region to re-render is empty")
        normalizers = case_normalizers(images, labels, region)
        if check is not None:
            check()
        box = lattice_box(region, self.network.size_multiple)
        brain = brain_mask(labels[box])
        # The box only: a whole-volume array of four contrasts costs more than the network on a typical region.
        normalized = np.empty((len(MODALITIES),) + brain.shape, np.float32)
        for c, m in enumerate(MODALITIES):
            normalized[c] = normalizers[m].forward(images[m][box], brain)
        network_start = time.perf_counter()
        predicted = self.predict_normalized(labels[box], normalized, region[box])
        network_seconds = time.perf_counter() - network_start
        inside = region[box]
        # Only the region's voxels are mapped back and blended (elementwise, so each voxel's value is the one a
        # box-wide computation gives; the box holds about four times as many voxels as a typical region).
        weight = feather_weight(inside, spacing, feather_mm)[inside]
        brain_inside = brain[inside]
        values_in_box = {}
        for c, m in enumerate(MODALITIES):
            synthetic = normalizers[m].inverse(predicted[c][inside], brain_inside)
            values = images[m][box].copy()
            real = values[inside].astype(np.float32)
            blended = weight * synthetic + (1.0 - weight) * real
            dtype = values.dtype
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                blended = np.clip(np.round(blended), info.min, info.max)
            values[inside] = blended.astype(dtype)
            values_in_box[m] = values
        return box, values_in_box, network_seconds

    def inpaint(self, labels: np.ndarray, images: dict[str, np.ndarray], region: np.ndarray,
                spacing: tuple[float, float, float], feather_mm: float = DEFAULT_FEATHER_MM) -> InpaintResult:
        """Re-render ``region`` of ``images`` from ``labels``; every voxel outside it is returned unchanged.

        Args:
            labels: the (edited) MedSynth label map on the images' grid.
            images: modality -> real image (any numeric type; the output keeps each one's type).
            region: voxels to re-render (bool).
            spacing: (k, j, i) voxel spacing in mm (feathering).
        """
        start = time.perf_counter()
        outputs = {m: images[m].copy() for m in MODALITIES}
        if not region.any():
            return InpaintResult(outputs, region.copy(), {"network": 0.0, "total": 0.0})
        box, values, network_seconds = self.inpaint_box(labels, images, region, spacing, feather_mm)
        for m in MODALITIES:
            outputs[m][box] = values[m]
        return InpaintResult(outputs, region.copy(), {"network": round(network_seconds, 3),
                                                      "total": round(time.perf_counter() - start, 3)})


@dataclass
class InpaintedCase:
    """What ``medsynth synthesize --context`` writes: images, the synthetic-voxel mask and the provenance."""

    labelmap: Any
    images: dict[str, np.ndarray]
    region: np.ndarray
    provenance: dict[str, Any]


def inpaint_case(engine: InpaintingEngine, labelmap: Any, context: ContextCase, *, old_labelmap: Any = None,
                 margin_mm: float = DEFAULT_MARGIN_MM, feather_mm: float = DEFAULT_FEATHER_MM) -> InpaintedCase:
    """Re-render the changed tumour region of a real case from an edited label map.

    Args:
        engine: a loaded inpainting model.
        labelmap: the edited label map, on the context's grid.
        context: the real case (:func:`read_context`).
        old_labelmap: the label map before the edit (on the same grid); without it the old tumour is the
            case's own segmentation (none when the case has no segmentation).
        margin_mm: growth of the changed tumour into the region.
        feather_mm: width of the blend inside the region's border.
    """
    import dataclasses

    from ..schema.provenance import InpaintingRecord, file_sha256, privacy_of
    from .case_folder import case_provenance

    if not np.isfinite(margin_mm) or not 0 <= margin_mm <= 100:
        raise MedSynthError(f"--region-margin {margin_mm}: give 0-100 mm")
    start = time.perf_counter()
    spacing = tuple(float(s) for s in labelmap.grid.spacing[::-1])
    if old_labelmap is not None:
        old_tumour, old_source, old_array = tumour_mask(old_labelmap.array), "old-labels", old_labelmap.array
    elif context.tumour is not None:
        old_tumour, old_source, old_array = context.tumour > 0, "case-segmentation", None
    else:
        old_tumour, old_source, old_array = None, "none", None
    region = changed_region(labelmap.array, old_tumour, margin_mm, spacing, old_array)
    region_seconds = time.perf_counter() - start
    result = engine.inpaint(labelmap.array, context.images, region, spacing, feather_mm)
    privacy = dataclasses.replace(privacy_of(labelmap), images="patient")
    record = InpaintingRecord(region_margin_mm=float(margin_mm), feather_mm=float(feather_mm), old_tumour=old_source,
                              synthetic_voxels=int(region.sum()), mirror_average=engine.mirror_average,
                              match_tissue=engine.match_tissue,
                              context_sha256={m: file_sha256(context.files[m]) for m in MODALITIES})
    provenance = case_provenance(engine.model, labelmap, privacy, seed=0, device=str(engine.synth.device),
                                 precision=engine.synth.precision)
    provenance["inpainting"] = dataclasses.asdict(record)
    provenance["timings_s"] = {"load_model": round(engine.load_seconds, 3), "region": round(region_seconds, 3),
                               "network": result.timings_s.get("network", 0.0),
                               "total": round(time.perf_counter() - start + engine.load_seconds, 3)}
    return InpaintedCase(labelmap, result.images, result.region, provenance)


def write_inpainted_case(case: InpaintedCase, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write the case folder: the images in the context's stored types, the mask, the provenance."""
    from .case_folder import write_case_folder

    return write_case_folder(case.labelmap, case.images, case.provenance, out_dir, overwrite=overwrite,
                             synthetic_mask=case.region, keep_types=True)
