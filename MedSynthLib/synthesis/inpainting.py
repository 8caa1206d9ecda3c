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
from ..schema.grid import AxisOrder
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
#: Least Dice of the label map's brain against the context case's brain (any contrast non-zero, as ``medsynth
#: labels`` draws it: 1.0 for a map derived from the case and edited).  Brains of different BraTS patients on the
#: shared atlas grid overlap with Dice 0.82-0.94, and their label maps would paint tissue outside the patient's brain.
MIN_BRAIN_DICE = 0.98


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
    """Write one case's condition into ``out`` (*padded, channels; contiguous).

    The label and region channels of every voxel are one row of a table indexed by (label, inside the region):
    one gather instead of a comparison per class written into a strided view (measured on 2 cores, a
    112 x 112 x 128 crop: 17 ms against 36 ms for the one-hot channels alone).
    """
    import torch

    inside = tuple(slice(0, n) for n in shape)
    labels_t = torch.full(padded, int(Label.BACKGROUND), dtype=torch.uint8)
    labels_t[inside] = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))
    region_t = torch.zeros(padded, dtype=torch.bool)
    region_t[inside] = torch.from_numpy(np.ascontiguousarray(region, dtype=bool))
    rows = torch.zeros((256, 2, INPUT_CHANNELS), dtype=out.dtype)  # (label, inside) -> its channels but the images
    rows[torch.arange(NUM_CLASSES), :, torch.arange(NUM_CLASSES)] = 1
    rows[:, 1, -1] = 1
    key = labels_t.view(-1).long() * 2 + region_t.view(-1).long()
    torch.index_select(rows.view(-1, INPUT_CHANNELS), 0, key, out=out.view(-1, INPUT_CHANNELS))
    blanked = out[..., NUM_CLASSES:NUM_CLASSES + len(MODALITIES)]
    if padded != shape:
        blanked.fill_(-1.0)
    real = torch.from_numpy(np.ascontiguousarray(images)).movedim(0, -1)
    blanked[inside] = torch.where(region_t[inside].unsqueeze(-1), BLANK_VALUE, real)


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
    grown = np.zeros_like(core)
    if core.any():
        box, inside = _ball_growth_box(core, margin_mm, spacing)
        grown[box] = inside
    return grown


def _ball_growth_box(core: np.ndarray, margin_mm: float,
                     spacing: tuple[float, float, float]) -> tuple[tuple[slice, ...], np.ndarray]:
    """:func:`_ball_growth` of a non-empty ``core`` as (box, the grown voxels of that box); none lie outside it.

    The exact squared distances come from the ``edt`` package (multi-label anisotropic Euclidean distance
    transform): on a real tumour's 86 x 89 x 93-voxel box, 51 ms against 125 ms for
    ``scipy.ndimage.distance_transform_edt``, and the same grown voxels (tested).
    """
    import edt

    from ..schema.grid import mask_box

    reach = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]
    box = mask_box(core, 0)
    box = tuple(slice(max(b.start - r, 0), min(b.stop + r, n)) for b, r, n in zip(box, reach, core.shape))
    squared = edt.edtsq(np.ascontiguousarray(~core[box]), anisotropy=tuple(float(s) for s in spacing),
                        black_border=False, parallel=1)
    return box, squared <= margin_mm * margin_mm


def grown_tumour(tumour: np.ndarray | None, shape: tuple[int, ...], margin_mm: float,
                 spacing: tuple[float, float, float]) -> np.ndarray:
    """The voxels within ``margin_mm`` of ``tumour`` (``None``: no tumour, nothing grown).

    :func:`changed_region` grows the old and the new tumour apart and joins them (a growth of a union is the
    union of the growths); the preview grows the case's own tumour once with this and passes it back.
    """
    return np.zeros(shape, bool) if tumour is None else _ball_growth(np.asarray(tumour, bool), margin_mm, spacing)


def changed_region(new_labels: np.ndarray, old_tumour: np.ndarray | None, margin_mm: float,
                   spacing: tuple[float, float, float], old_labels: np.ndarray | None = None, *,
                   old_grown: np.ndarray | None = None) -> np.ndarray:
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
        old_grown: :func:`grown_tumour` of ``old_tumour`` with the same margin and spacing, when the caller
            keeps it (the preview: the case's own tumour is grown once, not after every edit).
    """
    new_tumour = tumour_mask(new_labels)
    old = old_tumour if old_tumour is not None else np.zeros_like(new_tumour)
    if old_labels is not None:
        changed = old_labels != new_labels
        if not changed.any():
            return np.zeros_like(new_tumour)
        core = changed | ((old | new_tumour) if (changed & (old | new_tumour)).any() else changed)
        return _ball_growth(core, margin_mm, spacing) & brain_mask(new_labels)
    # The old and new tumours grown apart and joined (the growth of their union, or of the tumour in place when
    # they are equal: e.g. new sub-labels).  Only the new tumour is grown here when the caller keeps the old one's.
    region = np.array(grown_tumour(old_tumour, new_tumour.shape, margin_mm, spacing) if old_grown is None
                      else old_grown, dtype=bool, copy=True)
    if new_tumour.any():
        box, grown = _ball_growth_box(new_tumour, margin_mm, spacing)
        region[box] |= grown
    region &= brain_mask(new_labels)
    return region


def feather_weight(region: np.ndarray, spacing: tuple[float, float, float],
                   feather_mm: float = DEFAULT_FEATHER_MM) -> np.ndarray:
    """Blend weight of the synthetic image: 0 outside the region, rising to 1 over ``feather_mm`` inside it.

    The ramp counts the erosions (6-connected) a voxel survives, one per voxel of the finest spacing:
    n erosions give weights 1/(n+1) at the border ... 1 deep inside.  A voxel survives n erosions exactly
    when no voxel outside the region (nor the array's edge) lies within city-block distance n of it, so the
    count comes from one city-block distance transform instead of n erosions (half the time on a typical
    region's box).
    """
    from scipy import ndimage

    from ..schema.grid import mask_box

    weight = np.zeros(region.shape, np.float32)
    if not region.any():
        return weight
    steps = int(np.ceil(feather_mm / min(spacing))) if feather_mm > 0 else 0
    box = mask_box(region, 1)
    # Padded with outside voxels: an erosion treats the array's edge as outside the region.
    distance = ndimage.distance_transform_cdt(np.pad(region[box], 1), metric="taxicab")[1:-1, 1:-1, 1:-1]
    weight[box] = np.minimum(distance, steps + 1).astype(np.float32) / (steps + 1)
    return weight


@dataclass
class ContextCase:
    """A real case as context: its four contrasts exactly as stored, and its own tumour."""

    folder: Path
    images: dict[str, np.ndarray]  # modality -> (k, j, i) in the stored type
    tumour: np.ndarray | None  # schema tumour labels (0 or NCR/ED/ET), or None without a segmentation
    files: dict[str, Path]
    grid: Any = None  # the case's own :class:`~MedSynthLib.schema.grid.Grid` (the written images keep it)


def read_context(case_dir: str | Path, labelmap: Any) -> ContextCase:
    """Read a real case folder as context for ``labelmap``; every volume must be on the label map's grid.

    Raises:
        InputError: a MedSynth output folder, a missing modality, a grid that differs from the label map's (naming
            the file), or a label map whose brain is not this case's (:data:`MIN_BRAIN_DICE`).
    """
    import SimpleITK as sitk

    from ..cases.readers import read_case
    from .case_folder import is_medsynth_output

    if is_medsynth_output(case_dir):
        raise InputError(case_dir, "is a MedSynth output (partly or wholly synthetic images, no segmentation of the "
                                   "tumour they show), not a patient's case: give the original case as --context and "
                                   "its label map with every edit")
    case = read_case(case_dir)  # refuses a missing modality and volumes on different grids, naming the file
    difference = labelmap.grid.difference(case.grid)
    if difference is not None:
        raise InputError(case.files.get("t1", Path(case_dir)), f"not on the label map's grid: {difference}")
    dice = mask_dice(brain_mask(labelmap.array), case.brain_mask())
    if dice < MIN_BRAIN_DICE:
        raise InputError(case_dir, f"the label map's brain does not match this case's images (Dice {dice:.3f}, "
                                   f"{MIN_BRAIN_DICE} or more expected): a label map of another case? Derive it from "
                                   "this case (medsynth labels CASE) and edit that")
    images = {}
    for modality in MODALITIES:
        path = case.files[modality]
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        stored = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype
        values = case.images[modality]
        images[modality] = values.astype(stored) if np.array_equal(values, values.astype(stored)) else values
    return ContextCase(Path(case_dir), images, case.tumour, dict(case.files), case.grid)


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


#: Integer image types whose moments :class:`TissueMoments` sums exactly in int64 (|value| < 2**16).
EXACT_MOMENT_TYPES = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16))


NO_NORMALISATION_TISSUE = "the label map has no grey or white matter outside the region to normalise against"


def _normalisation_tissue(labels: np.ndarray) -> np.ndarray:
    """The voxels each contrast is normalised against: grey and white matter."""
    return (labels >= Label.GM) & (labels <= Label.WM)


def _moments(image: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """(count, sum, sum of squares) of an integer image inside ``mask``, exact."""
    values = image[mask].astype(np.int64)
    return int(values.size), int(values.sum()), int(np.dot(values, values))


def case_normalizers(images: dict[str, np.ndarray], labels: np.ndarray, exclude: np.ndarray,
                     moments: "TissueMoments | None" = None) -> dict[str, Any]:
    """Each contrast's ``tissue_zscore`` normaliser from the case's own grey and white matter outside ``exclude``.

    A contrast stored as integers of at most 16 bits (as scanners write them) is normalised from its exact
    moments, so ``moments`` (a :class:`TissueMoments` of the same images, kept by the preview) gives the same
    normalisers as a pass over the whole volume; other contrasts from a float64 pass over it.

    Raises:
        MedSynthError: no grey or white matter outside ``exclude``.
    """
    from .normalize import HealthyTissueZScore

    if moments is not None:
        return moments.normalizers(labels, exclude)
    reference = _normalisation_tissue(labels) & ~exclude
    if not reference.any():
        raise MedSynthError(NO_NORMALISATION_TISSUE)
    return {m: (HealthyTissueZScore.from_moments(*_moments(images[m], reference), NORMALIZATION)
                if images[m].dtype in EXACT_MOMENT_TYPES else HealthyTissueZScore.fit(images[m], reference, NORMALIZATION))
            for m in MODALITIES}


def intensity_floor(image: np.ndarray) -> float:
    """The lowest value a re-rendered voxel may take: 0 for scanner units, a z-scored scan's own minimum below 0."""
    return min(0.0, float(np.min(image)))


class TissueMoments:
    """The moments behind :func:`case_normalizers` for one real case, kept between edits.

    The preview normalises the case again after every edit, against the grey and white matter of the edited
    label map outside the region.  Each contrast's exact moments over the grey and white matter of the label
    map it was made with are summed once; after an edit only the box where the labels changed, together with
    the region's box, is summed again.  Integer moments make the result the same, bit for bit, as a pass over
    the whole volume; a float contrast is normalised by that pass.

    Args:
        images: modality -> the case's images as stored (not copied: they must not change).
        labels: the label map to start from (copied).
    """

    def __init__(self, images: dict[str, np.ndarray], labels: np.ndarray) -> None:
        self.images = images
        self.labels = np.array(labels, copy=True)
        tissue = _normalisation_tissue(self.labels)
        self.base = {m: _moments(images[m], tissue) for m in MODALITIES if images[m].dtype in EXACT_MOMENT_TYPES}
        self.floors = {m: intensity_floor(images[m]) for m in MODALITIES}  # a whole-volume pass: once, not per edit

    def normalizers(self, labels: np.ndarray, exclude: np.ndarray) -> dict[str, Any]:
        """:func:`case_normalizers` of the images for ``labels`` outside ``exclude``."""
        from ..schema.grid import mask_box
        from .normalize import HealthyTissueZScore

        if len(self.base) < len(MODALITIES):
            return case_normalizers(self.images, labels, exclude)
        boxes = [mask_box(mask) for mask in (self.labels != labels, exclude) if mask.any()]
        if boxes:
            box = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
            before = _normalisation_tissue(self.labels[box])
            after = _normalisation_tissue(labels[box]) & ~exclude[box]
        normalizers = {}
        for m in MODALITIES:
            count, total, squares = self.base[m]
            if boxes:
                image = self.images[m][box]
                removed, added = _moments(image, before), _moments(image, after)
                count, total, squares = (count - removed[0] + added[0], total - removed[1] + added[1],
                                         squares - removed[2] + added[2])
            if count == 0:
                raise MedSynthError(NO_NORMALISATION_TISSUE)
            normalizers[m] = HealthyTissueZScore.from_moments(count, total, squares, NORMALIZATION)
        return normalizers


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
    shifts = tissue_shifts(np.asarray(predicted)[:, region], labels, normalized, region, shell_voxels)
    for value, shift in shifts.items():
        out[:, region & (labels == value)] += shift[:, None]
    return out


def tissue_shifts(predicted_inside: np.ndarray, labels: np.ndarray, normalized: np.ndarray, region: np.ndarray,
                  shell_voxels: float = TISSUE_SHELL_VOXELS) -> dict[int, np.ndarray]:
    """:func:`match_tissue_medians`'s shift of each healthy class it shifts: class -> (4,) float32.

    Args:
        predicted_inside: (4, n) the network's output at the voxels of ``region`` (in C order, ``predicted[:,
            region]``): the inference path keeps only those.  The other arguments are
            :func:`match_tissue_medians`'s.
    """
    # Medians from every second voxel along each axis: the same statistics at an eighth of the cost (a 1.6 M-voxel
    # crop: 0.2 s at full resolution, mostly the distance transform).  Distances are in full-resolution voxels.
    lattice = (slice(None, None, 2),) * 3
    region_sub, labels_sub = region[lattice], labels[lattice]
    shell = _ball_growth(region_sub, shell_voxels, (2.0, 2.0, 2.0)) & ~region_sub
    on_lattice = np.zeros(region.shape, bool)
    on_lattice[lattice] = True
    predicted_sub = predicted_inside[:, on_lattice[region]]  # the region's lattice voxels, in C order
    labels_inside_sub = labels_sub[region_sub]
    real_sub = normalized[(slice(None),) + lattice]
    shifts = {}
    for value in (Label.CSF, Label.GM, Label.WM):
        inside, around = labels_inside_sub == value, shell & (labels_sub == value)
        if inside.sum() < MIN_TISSUE_VOXELS or around.sum() < MIN_TISSUE_VOXELS:
            continue
        shift = np.median(real_sub[:, around], axis=1) - np.median(predicted_sub[:, inside], axis=1)
        shifts[int(value)] = shift.astype(np.float32)
    return shifts


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
        output, mirrored = self._outputs(labels, normalized, region)
        predicted = output if mirrored is None else 0.5 * (output + mirrored)
        if self.match_tissue:
            predicted = match_tissue_medians(predicted, labels, normalized, region)
        return predicted

    def predict_inside(self, labels: np.ndarray, normalized: np.ndarray, region: np.ndarray,
                       axis_order: AxisOrder | None = None) -> np.ndarray:
        """:meth:`predict_normalized` at the voxels of ``region`` only: (4, n), ``predicted[:, region]``.

        The same values, without the whole-crop arrays of the average and the tissue shift (a typical
        region holds a fifth of its crop's voxels).  ``axis_order``: how the crop is stored; the network
        runs in its training order (LPS), where the mirror average's last axis is left-right.
        """
        if axis_order is not None and not axis_order.is_identity:
            def training(array: np.ndarray) -> np.ndarray:
                return np.ascontiguousarray(axis_order.to_training(array))

            region_t = training(region)
            inside_t = self.predict_inside(training(labels), training(normalized), region_t)
            crop = np.zeros((inside_t.shape[0],) + region_t.shape, np.float32)
            crop[:, region_t] = inside_t
            return np.ascontiguousarray(axis_order.to_stored(crop)[:, region])
        if self.mirror_average and labels.size <= MIRROR_BATCH_MAX_VOXELS:
            import torch

            # The batch's output read in the network's layout and precision at the region's voxels only: a
            # float32 copy of the whole output in the standard layout costs more than this.
            output = self.synth.predict_condition(self._mirror_batch(labels, normalized, region), keep_layout=True)
            padded = output.shape[2:]
            rows = output.permute(0, 2, 3, 4, 1).reshape(2, -1, output.shape[1])  # a view: one row per voxel
            k, j, i = np.nonzero(region)
            row = (k * padded[1] + j) * padded[2]
            at = [torch.from_numpy(row + i).to(rows.device),  # the crop's voxels, and the mirrored crop's
                  torch.from_numpy(row + (labels.shape[2] - 1 - i)).to(rows.device)]
            crop, mirrored = (rows[b].index_select(0, at[b]).float().cpu().numpy() for b in (0, 1))
            inside = np.ascontiguousarray((0.5 * (crop + mirrored)).T)
        else:
            output, mirrored = self._outputs(labels, normalized, region)
            inside = output[:, region] if mirrored is None else 0.5 * (output[:, region] + mirrored[:, region])
        if self.match_tissue:
            labels_inside = labels[region]
            for value, shift in tissue_shifts(inside, labels, normalized, region).items():
                inside[:, labels_inside == value] += shift[:, None]
        return inside

    def _outputs(self, labels: np.ndarray, normalized: np.ndarray,
                 region: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The network's output for the crop and, with the mirror average, the mirrored crop's output mirrored back
        (a view; ``None`` without the average)."""
        if self.mirror_average and labels.size <= MIRROR_BATCH_MAX_VOXELS:
            # One batch of the crop and its mirror image instead of two passes: measured on 2 idle AVX2 cores, a
            # 112^3 crop, 0.55 s instead of 2 x 0.37 s; each output within 3e-7 of its pass alone.
            both = self._forward_condition(self._mirror_batch(labels, normalized, region), labels.shape)
            return both[0], both[1][..., ::-1]
        if self.mirror_average:  # a large crop: two passes keep the peak memory of one
            mirrored = self.forward_normalized(np.ascontiguousarray(labels[..., ::-1]),
                                               np.ascontiguousarray(normalized[..., ::-1]),
                                               np.ascontiguousarray(region[..., ::-1]))
            return self.forward_normalized(labels, normalized, region), mirrored[..., ::-1]
        return self.forward_normalized(labels, normalized, region), None

    def _mirror_batch(self, labels: np.ndarray, normalized: np.ndarray, region: np.ndarray) -> Any:
        """The condition of the crop and of its mirror image, as one batch of two for the network."""
        return channels_last_condition(labels, normalized, region, self.synth.input_dtype, self.network.size_multiple,
                                       mirrored=True)

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
                    check: Callable[[], None] | None = None, moments: TissueMoments | None = None,
                    axis_order: AxisOrder | None = None,
                    ) -> tuple[tuple[slice, ...], dict[str, np.ndarray], float]:
        """Re-render ``region`` within its box: (box, modality -> the box of the image, network seconds).

        The box is :func:`lattice_box` (the region with at least :data:`INFERENCE_CONTEXT_VOXELS` of context,
        on the network's size multiple); outside ``region`` its values are the input's.  ``images`` is not
        modified.  ``check`` (the preview's stop callback) is called between the stages before the network and
        stops the call by raising (the network itself is stopped between layers by the caller's hooks).
        ``moments``: a :class:`TissueMoments` of ``images`` (the preview's), the same normalisers sooner.
        ``axis_order``: how the arrays are stored (:class:`~MedSynthLib.schema.grid.AxisOrder` of their grid;
        None: as the network was trained, LPS).

        Raises:
            MedSynthError: ``region`` is empty, or no grey/white matter is left to normalise against.
        """
        if not region.any():
            raise MedSynthError("the region to re-render is empty")
        normalizers = case_normalizers(images, labels, region, moments)
        if check is not None:
            check()
        box = lattice_box(region, self.network.size_multiple)
        brain = brain_mask(labels[box])
        # The box only: a whole-volume array of four contrasts costs more than the network on a typical region.
        normalized = np.empty((len(MODALITIES),) + brain.shape, np.float32)
        for c, m in enumerate(MODALITIES):
            normalized[c] = normalizers[m].forward(images[m][box], brain)
        network_start = time.perf_counter()
        inside = region[box]
        predicted = self.predict_inside(labels[box], normalized, inside, axis_order)
        network_seconds = time.perf_counter() - network_start
        # Only the region's voxels are mapped back and blended (elementwise, so each voxel's value is the one a
        # box-wide computation gives; the box holds about four times as many voxels as a typical region).
        weight = feather_weight(inside, spacing, feather_mm)[inside]
        brain_inside = brain[inside]
        floors = moments.floors if moments is not None else {m: intensity_floor(images[m]) for m in MODALITIES}
        values_in_box = {}
        for c, m in enumerate(MODALITIES):
            synthetic = normalizers[m].inverse(predicted[c], brain_inside, floors[m])
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
                spacing: tuple[float, float, float], feather_mm: float = DEFAULT_FEATHER_MM,
                axis_order: AxisOrder | None = None) -> InpaintResult:
        """Re-render ``region`` of ``images`` from ``labels``; every voxel outside it is returned unchanged.

        Args:
            labels: the (edited) MedSynth label map on the images' grid.
            images: modality -> real image (any numeric type; the output keeps each one's type).
            region: voxels to re-render (bool).
            spacing: (k, j, i) voxel spacing in mm (feathering).
            axis_order: how the arrays are stored (None: in the network's training order, LPS).
        """
        start = time.perf_counter()
        outputs = {m: images[m].copy() for m in MODALITIES}
        if not region.any():
            return InpaintResult(outputs, region.copy(), {"network": 0.0, "total": 0.0})
        box, values, network_seconds = self.inpaint_box(labels, images, region, spacing, feather_mm,
                                                        axis_order=axis_order)
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
    context_files: dict[str, Path] | None = None  # the real scan's files: written images copy their headers


@dataclass
class InpaintingPlan:
    """What :func:`inpaint_case` re-renders, settled before the model is loaded (:func:`plan_region`)."""

    region: np.ndarray  # bool: the voxels to re-render (never empty)
    old_tumour: str  # where the tumour before the edit came from (``InpaintingRecord.old_tumour``)
    old_labels_sha256: str | None = None  # content hash of the label map before the edit, when given
    seconds: float = 0.0


def old_tumour_from_history(labelmap: Any) -> tuple[np.ndarray | None, str | None]:
    """Where the patient's tumour was before the edits, read from the label map's history alone.

    Returns (the old tumour mask or ``None`` for none, ``None``) when the history says it, else (``None``, why
    not).  It says it only when it is exact: the map as ``medsynth labels`` derived it (the tumour in place), a
    measured privacy record whose source had no tumour, or one measured edit that left the patient's tumour where
    it was (over several edits the recorded Dice is an upper bound: a tumour moved there and back, or twice,
    may read 1.0; a privacy record inferred from a history bounds an edited map's Dice the same way).
    """
    from ..schema.provenance import PrivacyRecord

    history = labelmap.history
    start = history[0].get("name") if history and isinstance(history[0], dict) else None
    if not history:
        return None, "the label map has no history (an image copied without its .json sidecar?)"
    if start != "derive_labels":
        return None, ("the label map's history does not begin with this case's own labels (medsynth labels): a map "
                      "copied without its .json sidecar, then edited?")
    tracked = labelmap.privacy if isinstance(getattr(labelmap, "privacy", None), PrivacyRecord) else None
    tumour = tumour_mask(labelmap.array)
    in_place = tumour if tumour.any() else None
    params = history[0].get("params") if isinstance(history[0].get("params"), dict) else {}
    # A patient "without a tumour" is known only from a case that had a segmentation (older records do not say).
    no_tumour_known = params.get("tumour_segmentation") is True
    no_tumour_unknown = ("the label map was derived from a case without a tumour segmentation (or its record does "
                         "not say), so whether the patient had a tumour is not recorded")
    if tracked is None:
        if len(history) == 1:
            return (in_place, None) if in_place is not None or no_tumour_known else (None, no_tumour_unknown)
        return None, ("the label map's history records edits but not how far they moved the patient's tumour "
                      "(no measured privacy record in its sidecar)")
    dice = tracked.tumour_dice_to_source
    if tracked.anatomy != "patient":
        return None, "the label map's privacy record does not say it is this patient's anatomy"
    if dice is None:  # measured from the start: the patient's map had no tumour to move
        return (None, None) if no_tumour_known else (None, no_tumour_unknown)
    if dice < 1.0:
        return None, f"the edit changed the patient's own tumour (tumour Dice {dice:.2f} to it)"
    if len(history) <= 2 and tracked.tumour_origin != "unknown":
        return in_place, None
    return None, (f"after {len(history) - 1} edits the label map's record only bounds how far the patient's tumour "
                  "moved" if tracked.tumour_origin != "unknown" else "where the label map's tumour came from is "
                  "not recorded")


def plan_region(labelmap: Any, context: ContextCase, *, old_labelmap: Any = None,
                margin_mm: float = DEFAULT_MARGIN_MM, labels_name: str | Path | None = None) -> InpaintingPlan:
    """The region :func:`inpaint_case` re-renders, and where the old tumour came from; refused when unknown or empty.

    The old tumour is ``old_labelmap``'s, else the case's own segmentation, else what the label map's history
    says exactly (:func:`old_tumour_from_history`).  Cheap next to loading a model: callers check it first.

    Args:
        labels_name: the label map's file, named in the refusals (the Slicer worker has none).

    Raises:
        InputError: the old tumour's place cannot be established (the case has no segmentation, no
            ``old_labelmap`` is given and the history does not say it: the patient's tumour would stay in the
            images, labelled healthy tissue), or nothing is to be re-rendered (the map equals ``old_labelmap``, or
            no tumour changed).
        MedSynthError: ``margin_mm`` outside 0-100.
    """
    from ..schema.provenance import array_sha256

    if not np.isfinite(margin_mm) or not 0 <= margin_mm <= 100:
        raise MedSynthError(f"--region-margin {margin_mm}: give 0-100 mm")
    start = time.perf_counter()
    spacing = tuple(float(s) for s in labelmap.grid.spacing[::-1])
    old_array, old_sha256 = None, None
    if old_labelmap is not None:
        old_tumour, old_source, old_array = tumour_mask(old_labelmap.array), "old-labels", old_labelmap.array
        old_sha256 = array_sha256(old_labelmap.array)
    elif context.tumour is not None:
        old_tumour, old_source = context.tumour > 0, "case-segmentation"
    else:
        old_tumour, problem = old_tumour_from_history(labelmap)
        if problem is not None:
            raise InputError(context.folder, f"has no tumour segmentation, and {problem}: where the patient's tumour "
                                             "was is unknown, and it would stay in the images labelled as healthy "
                                             "tissue; give --old-labels (the label map before the edit), or make a "
                                             "whole synthetic case (in Slicer: Real case > Whole synthetic case)")
        old_source = "label-history"
    region = changed_region(labelmap.array, old_tumour, margin_mm, spacing, old_array)
    if not region.any():
        if old_array is not None and np.array_equal(old_array, labelmap.array):
            why = "the label map equals the label map before the edit (--old-labels)"
        elif old_array is not None:
            why = "the edit changed no voxel inside the brain"
        else:
            why = ("neither the label map nor the case has a tumour" if old_tumour is None
                   else "the label map's tumour is the case's own, in place")
        raise InputError(labels_name, f"{why}: nothing to re-render (the output would be the patient's scan "
                                      "unchanged); edit the tumour first")
    return InpaintingPlan(region, old_source, old_sha256, time.perf_counter() - start)


def inpaint_case(engine: InpaintingEngine, labelmap: Any, context: ContextCase, *, old_labelmap: Any = None,
                 margin_mm: float = DEFAULT_MARGIN_MM, feather_mm: float = DEFAULT_FEATHER_MM,
                 seed: int = 0, plan: InpaintingPlan | None = None) -> InpaintedCase:
    """Re-render the changed tumour region of a real case from an edited label map.

    Args:
        engine: a loaded inpainting model.
        labelmap: the edited label map, on the context's grid.
        context: the real case (:func:`read_context`).
        old_labelmap: the label map before the edit (on the same grid); without it the old tumour is the
            case's own segmentation, else what the label map's history says exactly (:func:`plan_region`).
        margin_mm: growth of the changed tumour into the region.
        feather_mm: width of the blend inside the region's border.
        seed: the run's seed, recorded (the network draws nothing: the same input gives the same images).
        plan: :func:`plan_region` of the same arguments, when the caller checked it before loading the model.

    Raises:
        InputError: :func:`plan_region`'s refusals: where the old tumour was cannot be established, or there is
            nothing to re-render.
    """
    import dataclasses

    from ..schema.provenance import InpaintingRecord, file_sha256, privacy_of
    from .case_folder import case_provenance

    if context.grid is not None and labelmap.grid != context.grid:  # within the grid tolerance: keep the case's
        labelmap = dataclasses.replace(labelmap, grid=context.grid)
    start = time.perf_counter()
    planned_before = plan is not None  # its seconds then lie before ``start``
    if plan is None:
        plan = plan_region(labelmap, context, old_labelmap=old_labelmap, margin_mm=margin_mm)
    region = plan.region
    spacing = tuple(float(s) for s in labelmap.grid.spacing[::-1])
    engine.synth.take_passes()  # passes of earlier work (a preview's) are not this case's
    result = engine.inpaint(labelmap.array, context.images, region, spacing, feather_mm,
                            AxisOrder.from_grid(labelmap.grid))
    passes = engine.synth.take_passes()
    privacy = dataclasses.replace(privacy_of(labelmap), images="patient")
    record = InpaintingRecord(region_margin_mm=float(margin_mm), feather_mm=float(feather_mm),
                              old_tumour=plan.old_tumour, old_labels_sha256=plan.old_labels_sha256,
                              synthetic_voxels=int(region.sum()), mirror_average=engine.mirror_average,
                              match_tissue=engine.match_tissue,
                              context_sha256={m: file_sha256(context.files[m]) for m in MODALITIES})
    provenance = case_provenance(engine.model, labelmap, privacy, seed=seed, device=str(engine.synth.device),
                                 precision=engine.synth.precision)
    provenance["seed_effective"] = False  # as the synthesis engine records a model without an appearance code
    provenance["inpainting"] = dataclasses.asdict(record)
    provenance["inference"] = passes  # sliding windows (an out-of-memory fallback) give other images
    elapsed = time.perf_counter() - start + (plan.seconds if planned_before else 0.0)
    provenance["timings_s"] = {"load_model": round(engine.load_seconds, 3), "region": round(plan.seconds, 3),
                               "network": result.timings_s.get("network", 0.0),
                               "total": round(elapsed + engine.load_seconds, 3)}
    return InpaintedCase(labelmap, result.images, result.region, provenance, dict(context.files))


def write_inpainted_case(case: InpaintedCase, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write the case folder: the images in the context's stored types, the mask, the provenance."""
    from .case_folder import write_case_folder

    return write_case_folder(case.labelmap, case.images, case.provenance, out_dir, overwrite=overwrite,
                             synthetic_mask=case.region, keep_types=True, like=case.context_files)
