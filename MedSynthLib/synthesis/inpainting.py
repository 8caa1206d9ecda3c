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
#: Context around the region that the network sees (voxels on each side of the region's box).
CONTEXT_VOXELS = 16
NORMALIZATION = "tissue_zscore"
INPUT_CHANNELS = NUM_CLASSES + len(MODALITIES) + 1
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


def channels_last_condition(labels: np.ndarray, images: np.ndarray, region: np.ndarray, dtype: Any) -> Any:
    """:func:`inpainting_condition` of one case, built in place in the channels-last layout of inference.

    The same values as the concatenation, without its float32 copies (on a 2-core CPU the concatenation
    and the layout change cost as much as the network on a typical region).

    Args:
        labels: (*spatial) label map; images: (4, *spatial) normalised; region: (*spatial) bool.
    """
    import torch

    labels_t = torch.from_numpy(np.ascontiguousarray(labels))
    region_t = torch.from_numpy(np.ascontiguousarray(region)).unsqueeze(-1)
    onehot = (labels_t.unsqueeze(-1) == torch.arange(NUM_CLASSES, dtype=labels_t.dtype)).to(dtype)
    blanked = torch.from_numpy(images).movedim(0, -1).masked_fill(region_t, BLANK_VALUE).to(dtype)
    out = torch.cat([onehot, blanked, region_t.to(dtype)], -1)
    return out[None].movedim(-1, 1)  # (1, C, *spatial), channels-last in memory


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


@dataclass
class InpaintResult:
    """Images of a real case with one region re-rendered."""

    images: dict[str, np.ndarray]  # modality -> stored type of the context
    region: np.ndarray  # bool: voxels that are (partly) synthetic
    timings_s: dict[str, float] = field(default_factory=dict)


class InpaintingEngine:
    """A loaded inpainting model on a device."""

    def __init__(self, model: Any, device: str = "auto", precision: str = "auto",
                 log: Callable[[str], None] = lambda message: None) -> None:
        from .inference import Synthesizer, pick_device, pick_precision
        from .models import load_generator
        from .networks import NetworkConfig

        start = time.perf_counter()
        self.network = NetworkConfig.from_json(model.config["network"])
        if self.network.kind != "inpainting":
            raise InputError(model.path, f"model {model.name} is a {self.network.kind} model, not an inpainting "
                                         "model (give --model an inpainting model)")
        self.model = model
        dev = pick_device(device)
        self.synth = Synthesizer(load_generator(model, "cpu"), self.network, dev, pick_precision(precision, dev),
                                 log=log)
        self.load_seconds = time.perf_counter() - start

    def predict_normalized(self, labels: np.ndarray, normalized: np.ndarray, region: np.ndarray,
                           box: tuple[slice, ...]) -> np.ndarray:
        """Network output (4, *box size) in ``[-1, 1]`` for ``labels[box]`` with ``region`` blanked."""
        import torch


        crop_labels = labels[box]
        multiple = self.network.size_multiple
        pads = [(0, (-s) % multiple) for s in crop_labels.shape]
        padded_labels = np.pad(crop_labels, pads, constant_values=Label.BACKGROUND)
        padded_images = np.pad(normalized[(slice(None),) + box], [(0, 0)] + pads, constant_values=-1.0)
        padded_region = np.pad(region[box], pads, constant_values=False)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.synth.precision, torch.float32)
        out = self.synth.predict_condition(channels_last_condition(padded_labels, padded_images, padded_region,
                                                                        dtype))
        return out[0, :, : crop_labels.shape[0], : crop_labels.shape[1], : crop_labels.shape[2]].cpu().numpy()

    def inpaint(self, labels: np.ndarray, images: dict[str, np.ndarray], region: np.ndarray,
                spacing: tuple[float, float, float], feather_mm: float = DEFAULT_FEATHER_MM) -> InpaintResult:
        """Re-render ``region`` of ``images`` from ``labels``; every voxel outside it is returned unchanged.

        Args:
            labels: the (edited) MedSynth label map on the images' grid.
            images: modality -> real image (any numeric type; the output keeps each one's type).
            region: voxels to re-render (bool).
            spacing: (k, j, i) voxel spacing in mm (feathering).
        """
        from ..schema.grid import mask_box

        start = time.perf_counter()
        outputs = {m: images[m].copy() for m in MODALITIES}
        if not region.any():
            return InpaintResult(outputs, region.copy(), {"network": 0.0, "total": 0.0})
        normalizers = case_normalizers(images, labels, region)
        box = mask_box(region, CONTEXT_VOXELS)
        brain = brain_mask(labels[box])
        normalized = np.full((len(MODALITIES),) + labels.shape, -1.0, np.float32)
        for c, m in enumerate(MODALITIES):
            normalized[(c,) + box] = normalizers[m].forward(images[m][box], brain)
        network_start = time.perf_counter()
        predicted = self.predict_normalized(labels, normalized, region, box)
        network_seconds = time.perf_counter() - network_start
        weight = feather_weight(region[box], spacing, feather_mm)
        inside = region[box]
        for c, m in enumerate(MODALITIES):
            synthetic = normalizers[m].inverse(predicted[c], brain)
            real = images[m][box].astype(np.float32)
            blended = weight * synthetic + (1.0 - weight) * real
            values = outputs[m][box]
            dtype = values.dtype
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                blended = np.clip(np.round(blended), info.min, info.max)
            values[inside] = blended[inside].astype(dtype)
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

    from ..schema.labels import SCHEMA_VERSION
    from ..schema.provenance import InpaintingRecord, array_sha256, file_sha256, privacy_of, software_versions

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
                              synthetic_voxels=int(region.sum()),
                              context_sha256={m: file_sha256(context.files[m]) for m in MODALITIES})
    provenance = {
        "kind": "medsynth-synthetic-case",
        "synthetic": True,
        "label_schema_version": SCHEMA_VERSION,
        "model": {"name": engine.model.name, "sha256": engine.model.sha256},
        "labels_sha256": array_sha256(labelmap.array),
        "edits": labelmap.history,
        "privacy": privacy.to_json(),
        "inpainting": dataclasses.asdict(record),
        "seed": 0,
        "device": str(engine.synth.device),
        "precision": engine.synth.precision,
        "grid": labelmap.grid.to_json(),
        "software": software_versions(),
        "timings_s": {"load_model": round(engine.load_seconds, 3), "region": round(region_seconds, 3),
                      "network": result.timings_s.get("network", 0.0),
                      "total": round(time.perf_counter() - start + engine.load_seconds, 3)},
    }
    return InpaintedCase(labelmap, result.images, result.region, provenance)


def write_inpainted_case(case: InpaintedCase, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write the case folder: the images in the context's stored types, the mask, the provenance."""
    from .case_folder import write_case_folder

    return write_case_folder(case.labelmap, case.images, case.provenance, out_dir, overwrite=overwrite,
                             synthetic_mask=case.region, keep_types=True)
