"""Case folders in, one schema out.

A *case* is the four co-registered modalities of one brain (T1, T1ce, T2,
FLAIR) and, when known, its expert tumour segmentation.  Four on-disk
conventions are read, auto-detected from the file names, with an explicit
override:

==============  ==================================================  ==============================
convention      files                                               tumour labels
==============  ==================================================  ==============================
``brats2021``   ``*_t1, *_t1ce, *_t2, *_flair, *_seg`` (2017-2021)  1 NCR, 2 ED, 4 ET
``brats2023``   ``*-t1n, *-t1c, *-t2w, *-t2f, *-seg``               1 NCR, 2 ED, 3 ET
``msd``         one 4D image (FLAIR, T1w, T1gd, T2w) + a label map  1 ED, 2 NET, 3 ET
``brats2015``   ``*.MR_T1.*, *.MR_T1c.*, *.MR_T2.*, *.MR_Flair.*,   1 necrosis, 2 ED, 3 NET, 4 ET
                *.OT.*`` (one sub-folder each, ``.mha``)
``toolkit``     TCGA / BraTS-Toolkit: ``*t1, *t1c*|*t1gd, *t2,      1 NCR, 2 ED, 4 ET
                *fla*``, each optionally ``*_bet``; ``*seg*`` or
                ``*GlistrBoost*``
==============  ==================================================  ==============================

Any other naming is read with :func:`read_case_files` (the CLI's ``--t1 --t1ce
--t2 --flair --seg``), where only the T1 is required.

The label tables live in :mod:`MedSynthLib.schema.labels`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from ..schema.errors import InputError
from ..schema.grid import Grid
from ..schema.labels import CONVENTIONS, MODALITIES, LabelValueError, NonIntegerLabelError, tumour_to_schema
from ..schema.volume_io import is_image_file, read_image, strip_image_suffix


#: File-name keys of each separate-file convention (modality -> suffix key).
_FILE_KEYS: dict[str, dict[str, str]] = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
_BRATS2015_KEYS = {"t1": "MR_T1", "t1ce": "MR_T1c", "t2": "MR_T2", "flair": "MR_Flair", "seg": "OT"}
#: Channel order of an MSD Task01 4D image.
MSD_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
CASE_CONVENTIONS: tuple[str, ...] = ("brats2021", "brats2023", "msd", "brats2015", "toolkit")
#: TCGA / BraTS-Toolkit names: the modality is the last token of the name (after an optional
#: ``_bet``, the skull-stripped marker), separated by ``_``, ``-`` or nothing at all.
_TOOLKIT_PATTERNS: dict[str, re.Pattern[str]] = {
    "t1": re.compile(r"(?:^|[_\-.])t1$"),
    "t1ce": re.compile(r"(?:^|[_\-.])(?:t1c\w*|t1gd|t1\-?gd)$"),
    "t2": re.compile(r"(?:^|[_\-.])t2$"),
    "flair": re.compile(r"(?:^|[_\-.])fla\w*$"),
    "seg": re.compile(r"(?:^|[_\-.])(?:seg\w*|glistrboost\w*)$"),
}
#: Tumour-label convention each naming convention implies (when it differs from its name).
_LABEL_CONVENTION_OF = {"toolkit": "brats2021", "explicit": "brats2021"}


@dataclass
class Case:
    """One brain: four modalities on one grid and its tumour in schema labels.

    Attributes:
        case_id: the folder (or MSD file) name; used for messages only, never exported.
        convention: the naming convention the case was read with.
        label_convention: the tumour-label convention applied to the segmentation.
        grid: the shared geometry of every volume.
        images: modality -> float32 (k, j, i) array in the scanner's units.
        tumour: ``uint8`` schema labels {0, 4, 5, 6}, or ``None`` without a segmentation.
        files: modality or ``"seg"`` -> source path.
    """

    case_id: str
    convention: str
    label_convention: str
    grid: Grid
    images: dict[str, np.ndarray]
    tumour: np.ndarray | None
    files: dict[str, Path] = field(default_factory=dict)

    def brain_mask(self) -> np.ndarray:
        """Brain = any modality non-zero (cases are skull-stripped) or tumour, holes filled."""
        return brain_mask_of(self.images.values(), self.tumour)


def brain_mask_of(images: Iterable[np.ndarray], tumour: np.ndarray | None) -> np.ndarray:
    """Any of the images non-zero (cases are skull-stripped) or tumour, holes filled: a case's brain. ``images`` may
    be a generator that reads one image at a time."""
    from scipy import ndimage

    mask = None
    for array in images:
        mask = array != 0 if mask is None else mask | (array != 0)
    if tumour is not None:
        mask = tumour > 0 if mask is None else mask | (tumour > 0)
    return ndimage.binary_fill_holes(mask)


def _files_by_key(folder: Path, keys: dict[str, str]) -> dict[str, list[Path]]:
    """Image files in ``folder`` whose name (without suffix) ends with each key."""
    found: dict[str, list[Path]] = {k: [] for k in keys}
    for path in sorted(folder.iterdir()):
        if not is_image_file(path):
            continue
        stem = strip_image_suffix(path.name).lower()
        for modality, key in keys.items():
            if stem.endswith(key.lower()):
                found[modality].append(path)
    return found


def _toolkit_files(folder: Path) -> dict[str, list[Path]]:
    """TCGA / BraTS-Toolkit names (``*_t1c_bet.nii.gz``, ``fla.nii.gz``, ``*_t1Gd.nii.gz`` ...)."""
    found: dict[str, list[Path]] = {k: [] for k in _TOOLKIT_PATTERNS}
    for path in sorted(folder.iterdir()):
        if not is_image_file(path):
            continue
        stem = re.sub(r"[_\-]bet$", "", strip_image_suffix(path.name).lower())
        for modality, pattern in _TOOLKIT_PATTERNS.items():
            if pattern.search(stem):
                found[modality].append(path)
                break
    return found


def _brats2015_files(folder: Path) -> dict[str, list[Path]]:
    """BRATS 2015 keeps each volume as ``VSD.Brain.XX.O.MR_T1.54513[/...].mha``."""
    found: dict[str, list[Path]] = {k: [] for k in _BRATS2015_KEYS}
    candidates = [p for p in sorted(folder.rglob("*")) if is_image_file(p) and len(p.relative_to(folder).parts) <= 2]
    for path in candidates:
        tokens = strip_image_suffix(path.name).split(".")
        for modality, key in _BRATS2015_KEYS.items():
            if key in tokens:
                found[modality].append(path)
    return found


def _msd_files(path: Path) -> tuple[Path, Path | None] | None:
    """Locate an MSD 4D image and its label map (``imagesTr/X`` -> ``labelsTr/X``)."""
    if path.is_file():
        image = path
        label = path.parent.parent / "labelsTr" / path.name
        return image, (label if label.exists() else None)
    images = [p for p in sorted(path.iterdir()) if is_image_file(p)]
    four_d = [p for p in images if _is_4d(p)]
    if len(four_d) != 1:
        return None
    others = [p for p in images if p != four_d[0]]
    labels = [p for p in others if re.search(r"label|seg", p.name, re.IGNORECASE)] or others
    return four_d[0], (labels[0] if len(labels) == 1 else None)


def _is_4d(path: Path) -> bool:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return reader.GetDimension() == 4 and reader.GetSize()[3] == 4


def detect_convention(path: str | os.PathLike[str]) -> str:
    """Name the convention of a case folder (or MSD image file).

    Raises:
        InputError: when no convention, or more than one, fits.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "case folder not found")
    if path.is_file():
        if _is_4d(path):
            return "msd"
        raise InputError(path, "a single file is a case only as an MSD 4D image (FLAIR, T1w, T1gd, T2w)")
    matches = []
    for name, keys in _FILE_KEYS.items():
        found = _files_by_key(path, keys)
        if sum(bool(found[m]) for m in MODALITIES) >= 2:
            matches.append(name)
    if not any(_complete(_files_by_key(path, _FILE_KEYS[name])) for name in matches):
        # The TCGA / BraTS-Toolkit names overlap BraTS 2021's (``_t1``, ``_t2``): they decide only
        # where no stricter convention finds all four modalities.
        toolkit = _toolkit_files(path)
        if sum(bool(toolkit[m]) for m in MODALITIES) >= 2 and (
                _complete(toolkit) or not matches):
            matches = ["toolkit"]
    if not matches:
        found15 = _brats2015_files(path)
        if sum(bool(found15[m]) for m in MODALITIES) >= 2:
            matches.append("brats2015")
    if not matches and _msd_files(path) is not None:
        matches.append("msd")
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(p.name for p in sorted(path.iterdir())[:8]) or "nothing"
    if not matches:
        raise InputError(
            path,
            "unknown case naming: expected BraTS 2021 (*_t1, *_t1ce, *_t2, *_flair[, *_seg]), "
            "BraTS 2023 (*-t1n, *-t1c, *-t2w, *-t2f[, *-seg]), TCGA / BraTS-Toolkit (*_t1, *_t1c, *_t2, *_fla"
            "[_bet]), an MSD 4D image or BRATS 2015 (*.MR_T1.*, ..., *.OT.*), or name the files with "
            f"--t1 --t1ce --t2 --flair --seg; found {listing}",
        )
    raise InputError(path, f"ambiguous case naming: fits {', '.join(matches)} (choose with --convention)")


def _complete(found: dict[str, list[Path]]) -> bool:
    return all(len(found[m]) == 1 for m in MODALITIES)


def _pick(found: dict[str, list[Path]], folder: Path, convention: str) -> dict[str, Path]:
    chosen: dict[str, Path] = {}
    for key, paths in found.items():
        if not paths:
            continue
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise InputError(folder, f"several files match {key!r} for {convention}: {names}")
        chosen[key] = paths[0]
    missing = [m for m in MODALITIES if m not in chosen]
    if missing:
        raise InputError(folder, f"missing modality {', '.join(missing)} ({convention} naming)")
    return chosen


def _check_grid(reference: Grid, ref_path: Path, image: sitk.Image, path: Path, resample: bool,
                interpolator: int) -> sitk.Image:
    grid = Grid.from_image(image)
    difference = reference.difference(grid)
    if difference is None:
        return reference.apply_to(image)  # snap tiny float differences onto the reference exactly
    if not resample:
        raise InputError(path, f"grid differs from {ref_path.name}: {difference} (use --resample to resample)")
    ref_image = reference.image(np.zeros(reference.shape, dtype=np.uint8))
    # Interpolated intensities stay float: casting back to an integer type truncates them.
    pixel = image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    return sitk.Resample(image, ref_image, sitk.Transform(), interpolator, 0.0, pixel)


def case_files(path: str | os.PathLike[str], *, convention: str | None = None) -> dict[str, Path]:
    """The files of a case folder (or MSD 4D image file), found by its naming alone: nothing is read but names and,
    for MSD, image headers.

    Returns:
        modality -> file for ``t1``, ``t1ce``, ``t2``, ``flair`` (one 4D file for all four under MSD), and ``seg``
        where the case has a tumour segmentation.

    Raises:
        InputError: when no convention fits, a modality is missing or several files match one.
    """
    path = Path(path)
    if convention is None:
        convention = detect_convention(path)
    elif convention not in CASE_CONVENTIONS:
        raise InputError(path, f"unknown convention {convention!r} (choose from {', '.join(CASE_CONVENTIONS)})")
    if convention == "msd":
        located = _msd_files(path) if path.exists() else None
        if located is None:
            raise InputError(path, "no single MSD 4D image (FLAIR, T1w, T1gd, T2w) found")
        image_path, seg_path = located
        files = {modality: image_path for modality in MSD_CHANNELS}
        if seg_path is not None:
            files["seg"] = seg_path
        return files
    if not path.is_dir():
        raise InputError(path, "case folder not found")
    if convention == "brats2015":
        found = _brats2015_files(path)
    elif convention == "toolkit":
        found = _toolkit_files(path)
    else:
        found = _files_by_key(path, _FILE_KEYS[convention])
    return _pick(found, path, convention)


def read_case(path: str | os.PathLike[str], *, convention: str | None = None,
              label_convention: str | None = None, resample: bool = False,
              require_segmentation: bool = False) -> Case:
    """Read a case folder (or MSD 4D image file) in any supported convention.

    Args:
        path: the case folder, or an MSD ``imagesTr/*.nii.gz`` file.
        convention: force a naming convention instead of detecting it.
        label_convention: force the tumour-label convention (default: the naming convention's).
        resample: resample volumes whose grid differs from the T1's instead of refusing.
        require_segmentation: refuse a case without a tumour segmentation.

    Raises:
        InputError: for every problem, naming the file and what is wrong.
    """
    path = Path(path)
    if convention is None:
        convention = detect_convention(path)
    elif convention not in CASE_CONVENTIONS:
        raise InputError(path, f"unknown convention {convention!r} (choose from {', '.join(CASE_CONVENTIONS)})")
    label_convention = label_convention or _LABEL_CONVENTION_OF.get(convention, convention)
    if label_convention not in CONVENTIONS:
        raise InputError(path, f"unknown label convention {label_convention!r}")

    files = case_files(path, convention=convention)
    raw: dict[str, sitk.Image] = {}
    if convention == "msd":
        image_path = files["t1"]
        four_d = read_image(image_path, dims=None)
        if four_d.GetDimension() != 4 or four_d.GetSize()[3] != len(MSD_CHANNELS):
            raise InputError(image_path, f"expected a 4D image with 4 channels, got size {four_d.GetSize()}")
        for channel, modality in enumerate(MSD_CHANNELS):
            raw[modality] = four_d[:, :, :, channel]
        case_id = strip_image_suffix(image_path.name)
    else:
        for modality in MODALITIES:
            raw[modality] = read_image(files[modality])
        case_id = path.name

    return _assemble(case_id, convention, label_convention, raw, files, resample, require_segmentation, path)


def read_case_files(files: dict[str, str | os.PathLike[str]], *, label_convention: str = "brats2021",
                    resample: bool = False, require_segmentation: bool = False) -> Case:
    """Read a case from explicitly named files, for any naming.

    Args:
        files: ``t1`` (required), ``t1ce``, ``t2``, ``flair`` and ``seg`` -> path.
        label_convention: tumour-label values of the segmentation.
        resample: resample volumes whose grid differs from the T1's instead of refusing.
        require_segmentation: refuse without ``seg``.

    Returns:
        A :class:`Case` of convention ``explicit`` holding the modalities given (a missing T2
        or FLAIR is allowed here: the anatomy model then says it falls back to T1 alone).

    Raises:
        InputError: for every problem, naming the file and what is wrong.
    """
    paths = {key: Path(value) for key, value in files.items() if value is not None}
    unknown = sorted(set(paths) - {*MODALITIES, "seg"})
    if unknown:
        raise InputError(None, f"unknown file kind(s) {', '.join(unknown)} (t1, t1ce, t2, flair, seg)")
    if "t1" not in paths:
        raise InputError(None, "a case needs at least its T1 (--t1)")
    if label_convention not in CONVENTIONS:
        raise InputError(paths["t1"], f"unknown label convention {label_convention!r}")
    raw = {m: read_image(paths[m]) for m in MODALITIES if m in paths}
    case_id = strip_image_suffix(paths["t1"].name)
    return _assemble(case_id, "explicit", label_convention, raw, paths, resample, require_segmentation,
                     paths["t1"])


def _assemble(case_id: str, convention: str, label_convention: str, raw: dict[str, sitk.Image],
              files: dict[str, Path], resample: bool, require_segmentation: bool, path: Path) -> Case:
    for modality, image in raw.items():
        # A tumour segmentation makes the brain mask non-empty on its own, so an all-zero scan would
        # otherwise pass as a brain of tumour only.  Checked as read, before any resampling.
        if not sitk.GetArrayViewFromImage(image).any():
            raise InputError(files[modality], f"empty brain: every {modality} voxel is zero")
    reference = Grid.from_image(raw["t1"])
    images: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        if modality not in raw:
            continue
        image = _check_grid(reference, files["t1"], raw[modality], files[modality], resample, sitk.sitkLinear)
        images[modality] = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)

    tumour = None
    if "seg" in files:
        seg_image = _check_grid(reference, files["t1"], read_image(files["seg"]), files["seg"], resample,
                                sitk.sitkNearestNeighbor)
        seg = sitk.GetArrayFromImage(seg_image)
        try:
            tumour = tumour_to_schema(seg, label_convention)
        except NonIntegerLabelError as exc:  # no convention reads fractions: do not point at --label-convention
            raise InputError(files["seg"], str(exc)) from None
        except LabelValueError as exc:
            raise InputError(files["seg"], f"{exc} (choose another with --label-convention)") from None
    elif require_segmentation:
        raise InputError(path, f"no tumour segmentation found ({convention} naming)")

    case = Case(case_id, convention, label_convention, reference, images, tumour, files)
    if not case.brain_mask().any():
        raise InputError(files["t1"], "empty brain: every modality is zero everywhere")
    return case
