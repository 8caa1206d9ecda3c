"""A blinded reader study (visual Turing test): can a reader tell MedSynth's images from real ones?

The reader sees 2D slices through the tumour, one contrast at a time, of real and synthetic cases
in a seeded random order under ids that carry no case name, and answers "real or synthetic?" with a
confidence.  This module plans the study, stores the answers as they come (CSV and JSON, each written
atomically, so a study can be closed and resumed) and summarises them: accuracy with an exact
(Clopper-Pearson) 95 % interval, per contrast, and the sensitivity and specificity of "synthetic".
About 50 % accuracy means the reader could not tell the two apart.

A synthetic case made from one of the study's own real cases (that patient's anatomy, or their tumour in place or
moved elsewhere, either also mirrored left-right) would show the reader one patient twice, real and synthetic, as
would two synthetic cases of one patient: the pair is judged together and the blinding is weak.  :func:`plan_study`
finds such pairs by comparing the cases themselves (provenance names no patient) and refuses them unless the study
is planned as a paired one (``allow_paired``: the pairs go into the plan and the summary); a plan made before the
check compared all this is checked again when resumed.

Files in the results folder:
    ``study_plan.json``  the seed, the order and, per item, the case, contrast, slice and truth
                         (the key: the reader's page never receives it), and the pairs of one patient;
    ``responses.csv`` / ``responses.json``  one row per answered item;
    ``summary.json`` / ``summary.md``  written by :func:`write_summary`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from ..schema.errors import InputError, MedSynthError, OutputExistsError
from ..cases.readers import MODALITIES
from ..schema.labels import Label
from ..schema.review import GENERATE_PROVENANCE_DIR, GENERATE_RUN_FILE, SYNTHETIC_KIND, provenance_path
from ..schema.volume_io import write_json

PLAN_VERSION = 1
TRUTHS = ("real", "synthetic")
#: Confidence of an answer: 1 = guessing, 2 = fairly sure, 3 = certain.
CONFIDENCES = (1, 2, 3)
PLAN_FILE = "study_plan.json"
RESPONSES_CSV = "responses.csv"
RESPONSES_JSON = "responses.json"
RESPONSE_FIELDS = ("item_id", "modality", "answer", "confidence", "truth", "correct", "answered_at")
#: Items are not independent: the four contrasts of one case, at one slice, are judged together.
CLUSTER_NOTE = ("Items are not independent (the contrasts of one case are shown at the same slice), so the interval "
                "and the p-value are too small a measure of the uncertainty.")


def chance_note(correct: int, total: int, p_value: float | None) -> str:
    """What the accuracy says against chance (50 %), without claiming more than the test can.

    Not rejecting chance is no evidence that the images are indistinguishable (7 of 8 right: p = 0.07, a 95 %
    interval of 47-100 %); an accuracy far below 50 % means the classes are told apart, the wrong way round.
    """
    if not total or p_value is None:
        return "No answers yet."
    p_text = f"p = {p_value:.3g}, exact two-sided binomial test against 50 %"
    if p_value >= 0.05:
        verdict = (f"Accuracy not shown to differ from chance ({p_text}); at {total} items that is not evidence that "
                   "the images are indistinguishable: the interval bounds how well the reader may tell them apart.")
    elif correct / total > 0.5:
        verdict = f"The reader told synthetic from real better than chance ({p_text})."
    else:
        verdict = (f"Accuracy below chance ({p_text}): the reader tells the images apart but has the classes "
                   "reversed.")
    return f"{verdict} {CLUSTER_NOTE}"


@dataclass
class CaseImages:
    """The files of one case as a viewer needs them.

    Attributes:
        folder: the case folder.
        synthetic: whether it is a MedSynth synthetic case (it has a MedSynth ``provenance.json``).
        files: modality -> image file.
        labels: the label file (synthetic: the 7-class map; real: the expert segmentation), or None.
        tumour: schema tumour labels {0, 4, 5, 6} on the case grid, or None without labels.
        brain: the brain mask (bool) where :func:`open_case` was asked for it, else None.
    """

    folder: Path
    synthetic: bool
    files: dict[str, Path]
    labels: Path | None
    tumour: np.ndarray | None
    brain: np.ndarray | None = None


#: The ``medsynth generate`` layouts with one folder per case (nnU-Net and MSD keep a case as files in imagesTr).
GENERATE_CASE_FOLDER_LAYOUTS = ("brats2021", "brats2023")


def is_synthetic_case(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a MedSynth synthetic case: its provenance (its own ``provenance.json``, or a ``medsynth
    generate`` dataset's record of it, :func:`~MedSynthLib.schema.review.provenance_path`) says so."""
    try:
        return json.loads(provenance_path(folder).read_text()).get("kind") == SYNTHETIC_KIND
    except (OSError, ValueError, AttributeError):
        return False


def is_patient_scan(folder: str | os.PathLike[str]) -> bool:
    """Whether a MedSynth case folder holds a patient's own images (``synthesize --context``: the real scan with
    one region re-rendered), which a reader study must not score as synthetic."""
    try:
        provenance = json.loads(provenance_path(folder).read_text())
        privacy = provenance.get("privacy") or {}
        return bool(provenance.get("inpainting")) or (isinstance(privacy, dict) and privacy.get("images") == "patient")
    except (OSError, ValueError, AttributeError):
        return False


def open_case(folder: str | os.PathLike[str], *, with_brain: bool = False) -> CaseImages:
    """A real case (any convention :func:`~MedSynthLib.cases.readers.read_case` reads) or a synthetic one: a
    ``medsynth synthesize`` folder, its ``medsynth export --format nifti`` (BraTS file names), or a case folder of
    a ``medsynth generate`` dataset in a BraTS layout (its provenance in the dataset's ``provenance/``).

    Args:
        with_brain: also fill in :attr:`CaseImages.brain` (what :func:`find_pairs` compares).

    Raises:
        InputError: a missing image, a DICOM export, or a folder of a generate dataset that is no case folder.
    """
    folder = Path(folder)
    if is_synthetic_case(folder):
        record = provenance_path(folder)
        if record.name != "provenance.json":
            return _open_generated(folder, json.loads(record.read_text()), with_brain)
        files = {m: folder / f"{m}.nii.gz" for m in MODALITIES}
        export = _export_record(folder)
        if export is not None and not all(path.is_file() for path in files.values()):
            return _open_export(folder, export, with_brain)
        for path in files.values():
            if not path.is_file():
                raise InputError(path, "missing image of the synthetic case")
        labels_path = folder / "labels.nii.gz"
        tumour = brain = None
        if labels_path.is_file():
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
            tumour = np.where(labels >= Label.NCR, labels, 0).astype(np.uint8)
            brain = labels > 0 if with_brain else None  # the label map is the brain the images were painted in
        elif with_brain:
            brain = _brain_of_images(files, tumour)
        return CaseImages(folder, True, files, labels_path if labels_path.is_file() else None, tumour, brain)
    from ..cases.readers import read_case

    refusal = _generate_dataset_refusal(folder)
    if refusal is not None:
        raise refusal
    case = read_case(folder)
    return CaseImages(folder, False, {m: Path(case.files[m]) for m in MODALITIES},
                      Path(case.files["seg"]) if "seg" in case.files else None, case.tumour,
                      case.brain_mask() if with_brain else None)


def _export_record(folder: Path) -> dict[str, Any] | None:
    """The ``export`` record of a ``medsynth export`` folder's provenance, or None."""
    try:
        export = json.loads((folder / "provenance.json").read_text()).get("export")
    except (OSError, ValueError, AttributeError):
        return None
    return export if isinstance(export, dict) else None


def _open_export(folder: Path, export: dict[str, Any], with_brain: bool) -> CaseImages:
    """A synthetic case as ``medsynth export --format nifti`` wrote it: BraTS file names, BraTS tumour values."""
    from ..cases.readers import read_case
    from ..export.nifti import NAMINGS

    if export.get("format") != "nifti":
        raise InputError(folder, f"a {str(export.get('format')).upper()} export: a case is read as NIfTI (the "
                                 "synthetic case folder, or medsynth export --format nifti)")
    naming = export.get("naming")
    case = read_case(folder, convention=naming if naming in NAMINGS else None)
    brain = None
    if with_brain:
        # The export's anatomy map and tumour are the label map the images were painted in.
        anatomy = folder / f"{export.get('case_id')}{NAMINGS[case.convention]['anatomy']}.nii.gz" \
            if case.convention in NAMINGS else None
        if anatomy is not None and anatomy.is_file():
            brain = sitk.GetArrayFromImage(sitk.ReadImage(str(anatomy))) > 0
            if case.tumour is not None:
                brain |= case.tumour > 0
        else:
            brain = case.brain_mask()
    return CaseImages(folder, True, {m: Path(case.files[m]) for m in MODALITIES},
                      Path(case.files["seg"]) if "seg" in case.files else None, case.tumour, brain)


def _open_generated(folder: Path, record: dict[str, Any], with_brain: bool) -> CaseImages:
    """A case folder of a ``medsynth generate`` dataset: images and seg named by its BraTS layout."""
    from ..cases.readers import read_case

    layout = record.get("layout")
    if layout not in GENERATE_CASE_FOLDER_LAYOUTS:
        raise InputError(folder, f"its medsynth generate record names the {layout} layout, which has no case folders")
    case = read_case(folder, convention=layout)
    # No label map is written beside the images: the brain is where they are non-zero (painted in its brain).
    return CaseImages(folder, True, {m: Path(case.files[m]) for m in MODALITIES},
                      Path(case.files["seg"]) if "seg" in case.files else None, case.tumour,
                      case.brain_mask() if with_brain else None)


def _generate_dataset_refusal(folder: Path) -> InputError | None:
    """The one line for a folder of a ``medsynth generate`` dataset that is not a complete case folder: the
    dataset itself, the nnU-Net/MSD dataset folder, its ``imagesTr`` or an MSD 4D image in it, or a case whose
    record is not written yet; None for any other folder."""
    resolved = folder.resolve()
    for depth, root in enumerate([resolved, *resolved.parents][:4]):
        if (root / GENERATE_RUN_FILE).is_file():
            break
    else:
        return None
    try:
        layout = json.loads((root / GENERATE_RUN_FILE).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        layout = None
    if layout in GENERATE_CASE_FOLDER_LAYOUTS:
        if depth == 1 and resolved.name != GENERATE_PROVENANCE_DIR:
            return InputError(folder, f"is a case of a medsynth generate dataset ({root}) without its record "
                                      f"{GENERATE_PROVENANCE_DIR}/{resolved.name}.json: the case is not complete; run "
                                      "the same medsynth generate command again to finish it")
        done = sorted(p.stem for p in (root / GENERATE_PROVENANCE_DIR).glob("*.json") if not p.name.startswith("."))
        example = root / (done[0] if done else "CASE_ID")
        return InputError(folder, f"is {'a' if depth == 0 else 'in a'} medsynth generate dataset ({layout} layout), "
                                  f"not one of its case folders: give the case folders, such as {example}")
    return InputError(folder, f"is {'a' if depth == 0 else 'part of a'} medsynth generate dataset in the "
                              f"{layout} layout, which keeps each case as files in imagesTr, not as a folder: review "
                              "and reader studies read one folder per case; run the same medsynth generate command "
                              "with --layout brats2021 (or brats2023) and another -o for the same cases, one "
                              "folder each")


def _brain_of_images(files: dict[str, Path], tumour: np.ndarray | None) -> np.ndarray:
    """The brain of a case's image files, found as a real case's is (one image in memory at a time)."""
    from ..cases.readers import brain_mask_of

    return brain_mask_of((sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in files.values()), tumour)


#: A synthetic case's brain mask this close to a real case's, or to its left-right mirror image, is that patient's
#: anatomy: a label map derived from a case keeps its brain mask exactly (Dice 1.00; edits move no brain outline),
#: while the 351 pairs of different patients among the 27 BraTS cases of the project's test data, on BraTS's
#: common (SRI24) grid, reached at most 0.95 (mirrored or not).
PAIRED_BRAIN_DICE = 0.99
#: A tumour this close to a real case's, in place or mirrored left-right, is that patient's tumour (copied: Dice
#: 1.00); the tumours of those 351 pairs overlapped at most 0.75 (0.74 against the mirror image).
PAIRED_TUMOUR_DICE = 0.9
#: A tumour whose shape, moved onto the other's centre of mass (mirrored left-right or not), overlaps the other's
#: this much is that patient's tumour moved (a whole-voxel move: Dice 1.00 unless the new brain clips it); the
#: tumours of those 351 pairs, so compared, reached at most 0.84 (0.82 without the mirror).
PAIRED_MOVED_TUMOUR_DICE = 0.9
#: What a plan's ``paired.check`` records: 2 compares mirror images, moved tumours and the synthetic cases among
#: themselves too; a plan from an earlier check is checked again when resumed.
PAIR_CHECK_VERSION = 2


@dataclass(frozen=True)
class _Mask:
    """A mask cut to its bounding box, where that box lies on its grid, and its centre of mass (voxel indices)."""

    crop: np.ndarray
    start: tuple[int, ...]
    centre: tuple[float, ...]
    count: int
    grid_shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: np.ndarray | None) -> "_Mask | None":
        if mask is None:
            return None
        from scipy import ndimage

        mask = np.asarray(mask, bool)
        (box,) = ndimage.find_objects(mask.astype(np.uint8)) or [None]
        if box is None:
            return None
        crop = np.ascontiguousarray(mask[box])
        start = tuple(s.start for s in box)
        centre = tuple(float(c) + s for c, s in zip(ndimage.center_of_mass(crop), start))
        return cls(crop, start, centre, int(np.count_nonzero(crop)), mask.shape)

    def mirrored(self, axis: int) -> "_Mask":
        """The mask flipped along array ``axis`` of its grid (about the grid's centre)."""
        n = self.grid_shape[axis]
        start, centre = list(self.start), list(self.centre)
        start[axis] = n - self.start[axis] - self.crop.shape[axis]
        centre[axis] = n - 1 - self.centre[axis]
        return _Mask(np.flip(self.crop, axis), tuple(start), tuple(centre), self.count, self.grid_shape)


def _overlap_dice(a: _Mask, b: _Mask, shift: Sequence[int] = (0, 0, 0)) -> float:
    """Dice of ``a`` and ``b`` moved by ``shift`` voxels (only the boxes' common part is compared)."""
    lo = [max(sa, sb + d) for sa, sb, d in zip(a.start, b.start, shift)]
    hi = [min(sa + na, sb + d + nb) for sa, na, sb, nb, d in zip(a.start, a.crop.shape, b.start, b.crop.shape, shift)]
    if any(h <= low for low, h in zip(lo, hi)):
        return 0.0
    in_a = tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, a.start))
    in_b = tuple(slice(low - s - d, h - s - d) for low, h, s, d in zip(lo, hi, b.start, shift))
    return 2 * int(np.count_nonzero(a.crop[in_a] & b.crop[in_b])) / (a.count + b.count)


@dataclass
class _PairShapes:
    """What :func:`find_pairs` compares of one case: its brain and tumour, as stored and mirrored left-right."""

    folder: Path
    brain: _Mask | None
    tumour: _Mask | None
    mirror_axis: int | None  # array axis that runs left-right on the case's grid; None: no mirror compared


def left_right_axis(image_file: str | os.PathLike[str]) -> int | None:
    """The array (k, j, i) axis of ``image_file``'s grid that runs left-right, as the synthesis' mirror average
    finds it (:class:`~MedSynthLib.schema.grid.AxisOrder`); None where the grid has no such axis (oblique)."""
    from ..schema.grid import AxisOrder, Grid

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image_file))
    reader.ReadImageInformation()
    grid = Grid(tuple(int(v) for v in reader.GetSize()), tuple(float(v) for v in reader.GetSpacing()),  # type: ignore
                tuple(float(v) for v in reader.GetOrigin()), tuple(float(v) for v in reader.GetDirection()))
    direction = grid.direction_matrix
    if len({int(np.argmax(np.abs(direction[:, axis]))) for axis in range(3)}) != 3:
        return None
    return AxisOrder.from_grid(grid).perm[2]


def _pair_shapes(case: CaseImages) -> _PairShapes:
    try:
        axis = left_right_axis(case.files["t1"])
    except (RuntimeError, KeyError):
        axis = None
    return _PairShapes(case.folder, _Mask.of(case.brain), _Mask.of(None if case.tumour is None else case.tumour > 0),
                       axis)


def _could_reach(a: _Mask, b: _Mask, at_least: float) -> bool:
    """Whether the counts alone let the Dice reach ``at_least`` (most pairs of different patients do not: their
    overlap is then not computed)."""
    return a.grid_shape == b.grid_shape and 2 * min(a.count, b.count) / (a.count + b.count) >= at_least


def _compare(x: _PairShapes, y: _PairShapes) -> dict[str, Any] | None:
    """What ``x`` and ``y`` share of one patient: ``shares`` (``brain``, ``tumour`` in place, ``moved_tumour``),
    each one's Dice and ``mirrored`` (the shares found only against the left-right mirror image); None if nothing."""
    mirror = x.mirror_axis if x.mirror_axis is not None and x.mirror_axis == y.mirror_axis else None
    found: dict[str, float] = {}
    mirrored: list[str] = []

    def best(name: str, a: _Mask, b: _Mask, at_least: float, align: bool) -> None:
        candidates = [(b, False)] + ([(b.mirrored(mirror), True)] if mirror is not None else [])
        for other, flipped in candidates:
            shift = np.rint(np.subtract(a.centre, other.centre)).astype(int) if align else (0, 0, 0)
            dice = _overlap_dice(a, other, shift)
            if dice >= at_least:
                found[name] = round(dice, 4)
                if flipped:
                    mirrored.append(name)
                return

    if x.brain is not None and y.brain is not None and _could_reach(x.brain, y.brain, PAIRED_BRAIN_DICE):
        best("brain", x.brain, y.brain, PAIRED_BRAIN_DICE, align=False)
    if x.tumour is not None and y.tumour is not None:
        if _could_reach(x.tumour, y.tumour, PAIRED_TUMOUR_DICE):
            best("tumour", x.tumour, y.tumour, PAIRED_TUMOUR_DICE, align=False)
        if "tumour" not in found and _could_reach(x.tumour, y.tumour, PAIRED_MOVED_TUMOUR_DICE):
            best("moved_tumour", x.tumour, y.tumour, PAIRED_MOVED_TUMOUR_DICE, align=True)
    if not found:
        return None
    return {"shares": list(found), "brain_dice": found.get("brain"), "tumour_dice": found.get("tumour"),
            "moved_tumour_dice": found.get("moved_tumour"), "mirrored": mirrored}


def find_pairs(real: Sequence[CaseImages], synthetic: Sequence[CaseImages]) -> list[dict[str, Any]]:
    """The synthetic cases that carry one of the real cases' patient: their brain (the anatomy was derived from
    that case), their tumour in place, or their tumour's shape moved elsewhere; each also as the left-right mirror
    image.  Cases opened ``with_brain``; cases on other grids are no pair.

    Returns:
        One record per pair, in the order given: ``real``, ``synthetic`` (resolved folders), ``shares``
        (``brain``, ``tumour`` and/or ``moved_tumour``), ``brain_dice``, ``tumour_dice``, ``moved_tumour_dice``
        (rounded; None where not close) and ``mirrored`` (the shares found in the mirror image).
    """
    real_shapes = [_pair_shapes(case) for case in real]
    pairs = []
    for syn in map(_pair_shapes, synthetic):
        for case in real_shapes:
            shared = _compare(case, syn)
            if shared is not None:
                pairs.append({"real": str(case.folder.resolve()), "synthetic": str(syn.folder.resolve()), **shared})
    return pairs


def find_synthetic_pairs(synthetic: Sequence[CaseImages]) -> list[dict[str, Any]]:
    """Pairs of synthetic cases of one patient (the same brain, tumour in place or tumour moved, as
    :func:`find_pairs` compares them): the reader would see that patient twice.

    Returns:
        One record per pair: ``synthetic`` (the two resolved folders, in the order given) and what
        :func:`find_pairs` records of what they share.
    """
    shapes = [_pair_shapes(case) for case in synthetic]
    pairs = []
    for index, first in enumerate(shapes):
        for second in shapes[index + 1:]:
            shared = _compare(first, second)
            if shared is not None:
                pairs.append({"synthetic": [str(first.folder.resolve()), str(second.folder.resolve())], **shared})
    return pairs


def _shared_text(pair: dict[str, Any]) -> str:
    """What a pair shares, in words, for the one-line refusal."""
    mirrored = set(pair.get("mirrored") or ())
    words = []
    for name in pair["shares"]:
        flip = name in mirrored
        if name == "brain":
            words.append(f"{'left-right mirrored ' if flip else ''}brain outline (brain-mask Dice "
                         f"{pair['brain_dice']:.2f}{' against the mirror image' if flip else ''}: one anatomy)")
        elif name == "tumour":
            words.append(f"tumour in place{', mirrored left-right' if flip else ''} (tumour Dice "
                         f"{pair['tumour_dice']:.2f})")
        else:
            words.append(f"tumour shape moved elsewhere{' and mirrored left-right' if flip else ''} (tumour Dice "
                         f"{pair['moved_tumour_dice']:.2f} with the centres aligned)")
    return " and ".join(words)


def _pair_refusal(pairs: list[dict[str, Any]], synthetic_pairs: Sequence[dict[str, Any]] = (),
                  why: str = "") -> InputError:
    """One line naming the first pair of one patient (a real and a synthetic case, else two synthetic ones)."""
    count = len(pairs) + len(synthetic_pairs)
    more = f" (and {count - 1} more such pair{'s' if count > 2 else ''})" if count > 1 else ""
    if pairs:
        first = pairs[0]
        where, other = first["synthetic"], f"the real case {first['real']}"
        seen = "real and synthetic"
    else:
        first = synthetic_pairs[0]
        where, other = first["synthetic"][1], f"the synthetic case {first['synthetic'][0]}"
        seen = "in two synthetic cases"
    return InputError(where, f"has the same {_shared_text(first)} as {other} of this study{more}{why}: the reader "
                             f"would see one patient twice, {seen}, and judge the pair rather than each image; "
                             "leave one of them out, or give --allow-paired to run a paired study (the pairs are "
                             "recorded in the plan and the summary)")


def tumour_centre_ras(case: CaseImages) -> list[float]:
    """RAS position (mm) of the tumour's centre of mass; the brain's centre when the case has no tumour.

    A viewer puts its slices here, so the reader sees the tumour.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(case.files["t1"]))
    reader.ReadImageInformation()
    if case.tumour is not None and case.tumour.any():
        index = np.argwhere(case.tumour > 0).mean(axis=0)
    else:
        index = (np.array(reader.GetSize()[::-1]) - 1) / 2.0
    k, j, i = (float(v) for v in index)
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    x, y, z = image.TransformContinuousIndexToPhysicalPoint((i, j, k))
    return [round(-x, 3), round(-y, 3), round(z, 3)]  # LPS -> RAS


@dataclass
class StudyItem:
    """One image the reader judges; ``item_id`` is all the reader's page shows of it."""

    item_id: str
    modality: str
    truth: str
    case: str
    image: str
    centre_ras: list[float]


def plan_study(real: Sequence[str | os.PathLike[str]], synthetic: Sequence[str | os.PathLike[str]],
               seed: int = 0, n_per_class: int | None = None,
               modalities: Sequence[str] = MODALITIES, allow_paired: bool = False) -> dict[str, Any]:
    """Draw the items (a case and a contrast each), balanced over classes and contrasts, in a seeded order.

    Args:
        real: real case folders.
        synthetic: synthetic case folders (MedSynth output, with ``provenance.json``).
        seed: seeds the draw and the order (recorded in the plan).
        n_per_class: items per class (default: as many as the smaller class has case-contrast pairs).
        modalities: the contrasts to show.
        allow_paired: accept synthetic cases made from the study's own real cases (:func:`find_pairs`) and
            synthetic cases of one patient (:func:`find_synthetic_pairs`); the plan's ``paired`` lists them either
            way.

    Raises:
        MedSynthError: empty class, a real folder that is synthetic or the reverse, a synthetic case of a real
            case's patient or two of one patient (without ``allow_paired``), or too many items asked.
    """
    if not real or not synthetic:
        raise MedSynthError("a reader study needs at least one real and one synthetic case")
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown or not modalities:
        raise MedSynthError(f"unknown contrasts {unknown} (choose from {', '.join(MODALITIES)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise MedSynthError(f"--seed must be a whole number in [0, 2**32), got {seed!r}")
    n_per_class_asked = n_per_class
    rng = np.random.default_rng(seed)
    cases: dict[str, list[CaseImages]] = {"real": [], "synthetic": []}
    for truth, folders in (("real", real), ("synthetic", synthetic)):
        for folder in folders:
            case = open_case(folder, with_brain=True)
            if case.synthetic != (truth == "synthetic"):
                raise InputError(folder, f"given as {truth} but it is {'a synthetic' if case.synthetic else 'a real'} case")
            if case.synthetic and is_patient_scan(folder):
                raise InputError(folder, "is a patient's scan with one region re-rendered (synthesize --context: "
                                         "mostly the patient's real images), not a synthetic case: leave it out of "
                                         "the study")
            cases[truth].append(case)
    _check_one_grid([case for t in TRUTHS for case in cases[t]], modalities)
    pairs, synthetic_pairs = find_pairs(cases["real"], cases["synthetic"]), find_synthetic_pairs(cases["synthetic"])
    if (pairs or synthetic_pairs) and not allow_paired:
        raise _pair_refusal(pairs, synthetic_pairs)
    for case in (case for t in TRUTHS for case in cases[t]):
        case.brain = None  # what the pairs needed: not kept for the rest of the plan
    available = min(len(cases[t]) for t in TRUTHS) * len(modalities)
    if n_per_class is None:
        n_per_class = available
    if not 1 <= n_per_class <= available:
        raise MedSynthError(f"--n-per-class must be 1..{available} for these cases and contrasts, got {n_per_class}")
    drawn: list[tuple[str, CaseImages, str]] = []
    for truth in TRUTHS:
        # Round-robin over contrasts so each contrast gets its share; cases in a seeded order, that
        # order rotated by one case per contrast so the items spread over the cases (without the
        # rotation every contrast would start with the same case: K <= 4 items, one case).
        order = [cases[truth][i] for i in rng.permutation(len(cases[truth]))]
        by_modality = {m: [(case, m) for case in order[j % len(order):] + order[:j % len(order)]]
                       for j, m in enumerate(modalities)}
        picked = []
        while len(picked) < n_per_class:
            for m in modalities:
                if by_modality[m] and len(picked) < n_per_class:
                    picked.append(by_modality[m].pop(0))
        drawn += [(truth, case, m) for case, m in picked]
    centres: dict[Path, list[float]] = {}
    items = []
    for position, index in enumerate(rng.permutation(len(drawn))):
        truth, case, modality = drawn[index]
        if case.folder not in centres:
            centres[case.folder] = tumour_centre_ras(case)
        items.append(StudyItem(f"item-{position + 1:03d}", modality, truth, str(case.folder.resolve()),
                               str(case.files[modality].resolve()), centres[case.folder]))
    from ..schema.provenance import file_sha256

    return {"kind": "medsynth-reader-study", "plan_version": PLAN_VERSION, "seed": seed,
            "n_per_class": n_per_class, "modalities": list(modalities),
            "created_at": _now(), "items": [asdict(item) for item in items],
            # What a resume checks: the inputs as given, and the content of every image shown.
            "inputs": {"real": sorted(_resolved(real)), "synthetic": sorted(_resolved(synthetic)),
                       "n_per_class": n_per_class_asked, "allow_paired": bool(allow_paired)},
            "paired": {"allowed": bool(allow_paired), "pairs": pairs, "synthetic_pairs": synthetic_pairs,
                       "check": PAIR_CHECK_VERSION},
            "files_sha256": {item.image: file_sha256(item.image) for item in items}}


def _resolved(folders: Sequence[str | os.PathLike[str]]) -> set[str]:
    return {str(Path(folder).resolve()) for folder in folders}


def _check_one_grid(cases: Sequence[CaseImages], modalities: Sequence[str]) -> None:
    """Refuse images on different grids (size, spacing, axes): the view's field of view and slice
    range would tell the reader which is which, whatever the image shows."""
    first: tuple[Path, tuple[Any, ...]] | None = None
    for case in cases:
        for modality in modalities:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(case.files[modality]))
            reader.ReadImageInformation()
            grid = (reader.GetSize(), reader.GetSpacing(), reader.GetDirection())
            if first is None:
                first = (case.files[modality], grid)
            elif grid[0] != first[1][0] or not np.allclose(grid[1], first[1][1], rtol=1e-4, atol=1e-5) \
                    or not np.allclose(grid[2], first[1][2], atol=1e-4):
                raise InputError(case.files[modality],
                                 f"is on another grid than {first[0]} (size {grid[0]} vs {first[1][0]}, spacing "
                                 f"{tuple(round(v, 4) for v in grid[1])} vs {tuple(round(v, 4) for v in first[1][1])} "
                                 "mm, or axes): readers would tell the images apart by the view's field of view; "
                                 "resample the study's cases to one grid")


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class ReaderStudy:
    """A study's results folder: its plan and the answers so far (resumable)."""

    def __init__(self, folder: str | os.PathLike[str], plan: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.plan = plan
        self.items = [StudyItem(**item) for item in plan["items"]]
        self._by_id = {item.item_id: item for item in self.items}
        self._lock: contextlib.ExitStack | None = None  # the results folder's lock while served
        self.responses: list[dict[str, Any]] = []
        path = self.folder / RESPONSES_JSON
        if path.is_file():
            try:
                responses = json.loads(path.read_text())["responses"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(path, f"cannot read the answers so far ({exc})") from None
            self.responses = self._checked_responses(path, responses)

    def _checked_responses(self, path: Path, responses: Any) -> list[dict[str, Any]]:
        """The answers of ``responses.json`` as this study wrote them, or one line naming what is wrong."""
        if not isinstance(responses, list):
            raise InputError(path, f"'responses' is not a list of answers (got {type(responses).__name__})")
        seen = set()
        for number, row in enumerate(responses, 1):
            problem = None
            if not isinstance(row, dict):
                problem = f"is not an object (got {type(row).__name__})"
            elif missing := [f for f in RESPONSE_FIELDS if f not in row]:
                problem = f"lacks {', '.join(missing)}"
            elif row["item_id"] not in self._by_id or row["item_id"] in seen:
                problem = f"names an item_id not in the plan or given twice ({row['item_id']!r})"
            elif row["answer"] not in TRUTHS or row["truth"] != self._by_id[row["item_id"]].truth \
                    or row["modality"] != self._by_id[row["item_id"]].modality:
                problem = "has an answer, truth or modality that does not fit the plan"
            elif type(row["confidence"]) is not int or row["confidence"] not in CONFIDENCES:
                problem = f"has the confidence {row['confidence']!r} (one of {CONFIDENCES})"
            elif row["correct"] is not (row["answer"] == row["truth"]):
                problem = "has a 'correct' that does not match its answer"
            if problem:
                raise InputError(path, f"answer {number} {problem}: not the answers this study wrote")
            seen.add(row["item_id"])
        return responses

    @classmethod
    def create_or_resume(cls, folder: str | os.PathLike[str], real: Sequence[str | os.PathLike[str]],
                         synthetic: Sequence[str | os.PathLike[str]], seed: int = 0,
                         n_per_class: int | None = None, allow_paired: bool = False) -> "ReaderStudy":
        """Resume the study in ``folder``, or plan a new one there (the plan is written first).

        Raises:
            MedSynthError: the folder holds a study of other cases, another seed or the other ``allow_paired``;
                see also :func:`plan_study`.
        """
        from ..schema.volume_io import check_folder_argument, enclosing_folder

        folder = Path(folder)
        check_folder_argument(folder, "results folder")  # a file, or under one: one line, nothing written
        inside = enclosing_folder(folder, [*real, *synthetic])
        if inside is not None:
            raise InputError(folder, f"is inside the case folder {inside}: the results hold the study's key; "
                                     "choose a results folder outside the case folders")
        lock = _lock_study(folder)
        try:
            study = cls._create_or_resume(folder, real, synthetic, seed, n_per_class, allow_paired)
        except BaseException:
            lock.close()
            raise
        study._lock = lock
        return study

    @classmethod
    def _create_or_resume(cls, folder: Path, real: Sequence[str | os.PathLike[str]],
                          synthetic: Sequence[str | os.PathLike[str]], seed: int,
                          n_per_class: int | None, allow_paired: bool) -> "ReaderStudy":
        plan_path = folder / PLAN_FILE
        if plan_path.is_file():
            study = cls.open(folder)
            study._check_inputs(plan_path, real, synthetic, seed, n_per_class, allow_paired)
            study._check_files()
            study._check_pairs(plan_path)
            return study
        if folder.exists() and any(folder.iterdir()):
            raise InputError(folder, "is not empty and holds no reader study: choose a new results folder")
        plan = plan_study(real, synthetic, seed=seed, n_per_class=n_per_class, allow_paired=allow_paired)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            write_json(plan, plan_path)
        except OutputExistsError:
            raise InputError(plan_path, "another medsynth review planned a study here meanwhile: resume it with "
                                        "the same command, or give another -o for a new study") from None
        return cls(folder, plan)

    def _check_inputs(self, plan_path: Path, real: Sequence[str | os.PathLike[str]],
                      synthetic: Sequence[str | os.PathLike[str]], seed: int, n_per_class: int | None,
                      allow_paired: bool = False) -> None:
        """Refuse a resume with other inputs than the plan's, saying what differs."""
        inputs = self.plan.get("inputs")
        differs = []
        if self.plan["seed"] != seed:
            differs.append(f"--seed {seed}, planned {self.plan['seed']}")
        # A plan from before pairs were checked was planned without the opt-in.
        planned_paired = bool(inputs.get("allow_paired")) if isinstance(inputs, dict) else False
        if planned_paired != bool(allow_paired):
            differs.append("--allow-paired given, planned without it" if allow_paired
                           else "no --allow-paired, planned as a paired study with it")
        if isinstance(inputs, dict):
            if inputs.get("n_per_class") != n_per_class:
                differs.append(f"--n-per-class {n_per_class if n_per_class is not None else '(none)'}, planned "
                               f"{inputs.get('n_per_class') if inputs.get('n_per_class') is not None else '(none)'}")
            for role, given in (("real", real), ("synthetic", synthetic)):
                if set(inputs.get(role) or []) != _resolved(given):
                    differs.append(f"the {role} cases")
        else:  # a plan written before the inputs were recorded: its items' cases by role, and the count
            if n_per_class is not None and n_per_class != self.plan.get("n_per_class"):
                differs.append(f"--n-per-class {n_per_class}, planned {self.plan.get('n_per_class')}")
            for role, given in (("real", real), ("synthetic", synthetic)):
                if not {item.case for item in self.items if item.truth == role} <= _resolved(given):
                    differs.append(f"the {role} cases")
        if differs:
            raise InputError(plan_path, f"holds a study with other inputs ({'; '.join(differs)}): resume it with "
                                        "the same command, or give another -o to start a new study")

    def _check_pairs(self, plan_path: Path) -> None:
        """A plan made before the pair check compared what it compares now (mirror images, moved tumours, the
        synthetic cases among themselves), and not as a paired study, is checked now as a new plan would be."""
        paired = self.plan.get("paired")
        if isinstance(paired, dict) and (paired.get("allowed") or paired.get("check") == PAIR_CHECK_VERSION):
            return
        inputs = self.plan.get("inputs")
        if isinstance(inputs, dict) and inputs.get("allow_paired"):
            return
        cases = {}
        for truth in TRUTHS:
            # All the cases given (a plan of fewer items draws from them all), else those of its items.
            folders = inputs.get(truth) if isinstance(inputs, dict) and inputs.get(truth) else \
                list(dict.fromkeys(item.case for item in self.items if item.truth == truth))
            cases[truth] = [open_case(folder, with_brain=True) for folder in folders]
        pairs, synthetic_pairs = find_pairs(cases["real"], cases["synthetic"]), find_synthetic_pairs(cases["synthetic"])
        if pairs or synthetic_pairs:
            raise _pair_refusal(pairs, synthetic_pairs, f" (found on resuming {plan_path}, planned before MedSynth "
                                                        "checked for this)")

    def _check_files(self) -> None:
        """Every planned image is there and, where the plan recorded it, unchanged (sha256)."""
        from ..schema.provenance import file_sha256

        hashes = self.plan.get("files_sha256") or {}
        for item in self.items:
            path = Path(item.image)
            if not path.is_file():
                raise InputError(path, f"image of {item.item_id} is missing (moved or deleted since the study "
                                       "was planned): put it back, or give another -o to start a new study")
            if item.image in hashes:
                try:
                    digest = file_sha256(path)
                except OSError as exc:
                    raise InputError(path, f"image of {item.item_id} cannot be read ({exc})") from None
                if digest != hashes[item.image]:
                    raise InputError(path, f"image of {item.item_id} changed since the study was planned "
                                           "(sha256 differs; regenerated?): put the planned image back, or give "
                                           "another -o to start a new study")

    def close(self) -> None:
        """Release the results folder (another server may then resume the study)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "ReaderStudy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> "ReaderStudy":
        plan_path = Path(folder) / PLAN_FILE
        try:
            plan = json.loads(plan_path.read_text())
        except FileNotFoundError:
            raise InputError(folder, f"no reader study here ({PLAN_FILE} missing)") from None
        except (OSError, ValueError) as exc:
            raise InputError(plan_path, f"cannot read the study plan ({exc})") from None
        if plan.get("kind") != "medsynth-reader-study" or plan.get("plan_version") != PLAN_VERSION:
            raise InputError(plan_path, f"not a MedSynth reader study plan (version {PLAN_VERSION})")
        return cls(folder, plan)

    def item(self, item_id: str) -> StudyItem:
        return self._by_id[item_id]

    def answered(self) -> set[str]:
        return {r["item_id"] for r in self.responses}

    def next_item(self) -> StudyItem | None:
        """The first item in the planned order not answered yet (None when the study is complete)."""
        done = self.answered()
        return next((item for item in self.items if item.item_id not in done), None)

    def answer(self, item_id: str, answer: str, confidence: int) -> dict[str, Any]:
        """Record one answer and rewrite ``responses.csv`` and ``responses.json`` atomically."""
        if self._lock is None:
            raise MedSynthError(f"{self.folder}: the study is not held by this process (opened read-only, or "
                                "closed): nothing saved")
        if not isinstance(item_id, str) or item_id not in self._by_id:
            raise MedSynthError(f"unknown study item {item_id!r}")
        if item_id in self.answered():
            raise MedSynthError(f"{item_id} is already answered")
        if not isinstance(answer, str) or answer not in TRUTHS:
            raise MedSynthError(f"the answer must be 'real' or 'synthetic', got {answer!r}")
        if type(confidence) is not int or confidence not in CONFIDENCES:
            raise MedSynthError(f"the confidence must be one of {CONFIDENCES}, got {confidence!r}")
        item = self._by_id[item_id]
        row = {"item_id": item_id, "modality": item.modality, "answer": answer, "confidence": confidence,
               "truth": item.truth, "correct": answer == item.truth, "answered_at": _now()}
        self.responses.append(row)
        self._save()
        return row

    def _save(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RESPONSE_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.responses)
        _write_text_atomic(self.folder / RESPONSES_CSV, buffer.getvalue())
        write_json({"seed": self.plan["seed"], "n_items": len(self.items), "responses": self.responses},
                   self.folder / RESPONSES_JSON, overwrite=True)


def _lock_study(folder: Path) -> contextlib.ExitStack:
    """Hold the results folder's output lock for as long as the study is served (closing the stack releases it);
    refuse at once when another process holds it."""
    from ..schema.outputs import output_lock

    held = contextlib.ExitStack()
    try:
        held.enter_context(output_lock(folder.resolve(), wait=False))
    except BlockingIOError:
        raise InputError(folder, "another medsynth review is serving this study (one server per results "
                                 "folder): stop it first, or give another -o") from None
    return held


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def proportion(successes: int, total: int) -> dict[str, Any]:
    """A proportion with its exact (Clopper-Pearson) 95 % interval; None values when there is no trial."""
    from scipy.stats import binomtest

    if total == 0:
        return {"k": 0, "n": 0, "rate": None, "ci95": None}
    interval = binomtest(successes, total).proportion_ci(confidence_level=0.95, method="exact")
    return {"k": successes, "n": total, "rate": round(successes / total, 4),
            "ci95": [round(float(interval.low), 4), round(float(interval.high), 4)]}


def summarise(responses: Sequence[dict[str, Any]], n_items: int | None = None) -> dict[str, Any]:
    """Accuracy (95 % CI), per contrast, and sensitivity / specificity of answering "synthetic".

    Sensitivity: synthetic images called synthetic; specificity: real images called real.
    """
    correct = [bool(r["correct"]) for r in responses]
    per_modality = {}
    for modality in MODALITIES:
        rows = [r for r in responses if r["modality"] == modality]
        if rows:
            per_modality[modality] = proportion(sum(bool(r["correct"]) for r in rows), len(rows))
    synthetic = [r for r in responses if r["truth"] == "synthetic"]
    real = [r for r in responses if r["truth"] == "real"]
    by_confidence = {}
    for level in CONFIDENCES:
        rows = [r for r in responses if int(r["confidence"]) == level]
        if rows:
            by_confidence[str(level)] = proportion(sum(bool(r["correct"]) for r in rows), len(rows))
    from scipy.stats import binomtest

    p_value = float(binomtest(sum(correct), len(correct), 0.5).pvalue) if correct else None
    return {
        "answered": len(responses), "planned": n_items,
        "accuracy": proportion(sum(correct), len(correct)),
        # Four significant digits: rounding to decimals wrote 40 of 40 right (p = 1.8e-12) as 0.0.
        "p_vs_chance": None if p_value is None else float(f"{p_value:.4g}"),
        "per_modality": per_modality,
        "sensitivity_synthetic": proportion(sum(r["answer"] == "synthetic" for r in synthetic), len(synthetic)),
        "specificity_synthetic": proportion(sum(r["answer"] == "real" for r in real), len(real)),
        "accuracy_by_confidence": by_confidence,
        "interval": "exact binomial (Clopper-Pearson) 95 %",
        "note": chance_note(sum(correct), len(correct), p_value),
    }


#: A summary table's cell where no answer is there to measure (a study not started, no real item answered yet).
NO_ANSWERS = "n/a (no answers yet)"


def _fmt(p: dict[str, Any]) -> str:
    if not p["n"]:
        return NO_ANSWERS
    low, high = p["ci95"]
    return f"{100 * p['rate']:.1f} % ({p['k']}/{p['n']}; 95 % CI {100 * low:.1f}-{100 * high:.1f} %)"


def _p_cell(p_value: float | None) -> str:
    return NO_ANSWERS if p_value is None else f"{p_value:.3g}"


def summary_text(summary: dict[str, Any]) -> str:
    """The summary as Markdown (what ``medsynth review --summarise`` prints)."""
    lines = ["# Reader study: real or synthetic?", "",
             f"Answered {summary['answered']}"
             f"{'' if summary['planned'] is None else ' of ' + str(summary['planned'])} items.", "",
             "| measure | value |", "|---|---|",
             f"| accuracy | {_fmt(summary['accuracy'])} |",
             f"| p against chance (50 %), exact binomial | {_p_cell(summary.get('p_vs_chance'))} |"]
    lines += [f"| accuracy, {m} | {_fmt(p)} |" for m, p in summary["per_modality"].items()]
    lines += [f"| sensitivity (synthetic called synthetic) | {_fmt(summary['sensitivity_synthetic'])} |",
              f"| specificity (real called real) | {_fmt(summary['specificity_synthetic'])} |"]
    lines += [f"| accuracy at confidence {c} | {_fmt(p)} |" for c, p in summary["accuracy_by_confidence"].items()]
    lines += ["", f"Intervals: {summary['interval']}. {summary['note']}", ""]
    paired = summary.get("paired")
    if paired:
        lines += ["## Paired study", "", paired["note"], "",
                  "| case | case | shares |", "|---|---|---|"]
        lines += [f"| {Path(p['real']).name} (real) | {Path(p['synthetic']).name} | {_shares_cell(p)} |"
                  for p in paired["pairs"]]
        lines += [f"| {Path(p['synthetic'][0]).name} | {Path(p['synthetic'][1]).name} | {_shares_cell(p)} |"
                  for p in paired.get("synthetic_pairs") or []]
        lines += ["", f"Accuracy on the items of these cases: {_fmt(paired['items_of_paired_cases'])}; on the "
                      f"other items: {_fmt(paired['other_items'])}.", ""]
    return "\n".join(lines)


def _shares_cell(pair: dict[str, Any]) -> str:
    mirrored = set(pair.get("mirrored") or ())
    return ", ".join(f"{name.replace('_', ' ')}{' (mirrored)' if name in mirrored else ''} (Dice "
                     f"{pair[name + '_dice']:.2f})" for name in pair["shares"])


def paired_summary(study: "ReaderStudy") -> dict[str, Any] | None:
    """For a study planned with pairs of one patient: the pairs, and the accuracy on the items of those cases
    and on the others (how far the pairs may have carried the result); None for a study without pairs."""
    paired = study.plan.get("paired") or {}
    pairs, synthetic_pairs = paired.get("pairs") or [], paired.get("synthetic_pairs") or []
    if not pairs and not synthetic_pairs:
        return None
    cases = {folder for pair in pairs for folder in (pair["real"], pair["synthetic"])}
    cases |= {folder for pair in synthetic_pairs for folder in pair["synthetic"]}
    of_pairs = {item.item_id for item in study.items if item.case in cases}
    rows = [r for r in study.responses if r["item_id"] in of_pairs]
    others = [r for r in study.responses if r["item_id"] not in of_pairs]
    notes = []
    if pairs:
        notes.append(f"{len(pairs)} synthetic case(s) carry the patient of a real case of this study: the reader saw "
                     "that patient twice, real and synthetic.")
    if synthetic_pairs:
        notes.append(f"{len(synthetic_pairs)} pair(s) of synthetic cases carry one patient: the reader saw that "
                     "patient twice, in two synthetic cases.")
    summary = {"pairs": pairs,
               "items_of_paired_cases": proportion(sum(bool(r["correct"]) for r in rows), len(rows)),
               "other_items": proportion(sum(bool(r["correct"]) for r in others), len(others)),
               "note": " ".join(notes) + " Planned with --allow-paired: those items were not judged blind to each "
                                         "other."}
    if synthetic_pairs:
        summary["synthetic_pairs"] = synthetic_pairs
    return summary


def write_summary(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise the answers in a results folder into ``summary.json`` and ``summary.md`` (atomically)."""
    study = ReaderStudy.open(folder)
    summary = summarise(study.responses, len(study.items))
    paired = paired_summary(study)
    if paired is not None:
        summary["paired"] = paired
    write_json(summary, study.folder / "summary.json", overwrite=True)
    _write_text_atomic(study.folder / "summary.md", summary_text(summary))
    return summary
