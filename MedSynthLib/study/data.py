"""Data side of ``medsynth study``: the common study grid, case preparation and synthetic cases.

Every case of a study (real, synthetic, the healthy template) lives on one
*study grid*: isotropic voxels of ``spacing_mm``, a box of the same size for
every case, centred on that case's brain and kept in the case's own physical
(LPS) space, with an identity direction so that arrays of different cases are
voxel-wise comparable.  Images are resampled linearly, labels by nearest
neighbour (SimpleITK).  The healthy ICBM152 template lives in MNI space, not in
the SRI24 space of BraTS: it is mapped onto the study grid by the axis-aligned
scaling that takes its brain bounding box onto the mean brain bounding box of
the real cases (a crude 6-parameter alignment, enough for a canvas).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from ..cases.readers import MODALITIES, Case, read_case
from ..schema.errors import EditError, InputError
from ..schema.grid import Grid, LabelMap, lps_to_ras
from ..schema.labels import Label, LabelValueError, schema_to_tumour, tumour_mask, tumour_to_schema
from ..schema.volume_io import atomic_directory, is_image_file, read_image, strip_image_suffix, write_image, write_json

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: Version of the prepared-case layout: bump to invalidate every study cache.
PREP_VERSION = 2
#: Version of the study's cached stages and report: bump to invalidate every stage cache.
#: Here, not in ``run``, so that ``report`` reads it without importing ``run`` (no import cycle).
STUDY_VERSION = 1


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def files_sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def case_sha256(case: Case) -> str:
    """Content hash of a case's files (sorted by role)."""
    return files_sha256([case.files[name] for name in sorted(case.files)])


# --- the study grid ----------------------------------------------------------------------------


def tumour_sha256(tumour: np.ndarray) -> str:
    """sha256 of schema tumour labels (uint8, array order): equal for the same patient's label map."""
    array = np.ascontiguousarray(np.asarray(tumour, np.uint8))
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


def _mask_extent_lps(mask: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS box (min, max) of a mask's voxel centres."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    lps = grid.index_to_lps(corners[:, ::-1])
    return lps.min(0), lps.max(0)


@dataclass(frozen=True)
class StudyGrid:
    """Isotropic ``spacing`` and a common ``size`` (i, j, k); each case centres it on its brain."""

    spacing: float
    size: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])

    def grid_at(self, centre_lps: np.ndarray) -> Grid:
        half = (np.asarray(self.size, float) - 1.0) / 2.0 * self.spacing
        origin = np.asarray(centre_lps, float) - half
        return Grid(tuple(int(s) for s in self.size), (self.spacing,) * 3,  # type: ignore[arg-type]
                    tuple(float(v) for v in origin), IDENTITY)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {"spacing_mm": self.spacing, "size": list(self.size)}

    @classmethod
    def fit(cls, extents_mm: list[np.ndarray], spacing: float, margin_mm: float, multiple: int,
            box_mm: Sequence[float] | None = None) -> "StudyGrid":
        """The smallest box (a multiple of ``multiple`` voxels) holding every brain plus a margin."""
        extent = np.asarray(box_mm, float) if box_mm else np.max(np.stack(extents_mm), axis=0) + 2 * margin_mm
        voxels = np.ceil(extent / spacing / multiple).astype(int) * multiple
        return cls(float(spacing), tuple(int(max(v, multiple)) for v in voxels))  # type: ignore[arg-type]


def resample(image: sitk.Image, grid: Grid, *, label: bool, transform: sitk.Transform | None = None) -> np.ndarray:
    reference = grid.image(np.zeros(grid.shape, np.uint8))
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    pixel = image.GetPixelID() if label else sitk.sitkFloat32
    out = sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, 0.0, pixel)
    return sitk.GetArrayFromImage(out)


@dataclass
class CaseInfo:
    """A real case as the study sees it before any work: identity, hash, brain geometry."""

    case_id: str
    folder: Path
    convention: str
    sha256: str
    centre_lps: np.ndarray
    extent_mm: np.ndarray
    tumour_voxels: dict[str, int]
    tumour_sha256: str = ""  # of the schema tumour labels: finds the same patient's label map elsewhere


def inspect_case(folder: Path) -> tuple[CaseInfo, Case]:
    case = read_case(folder, require_segmentation=True)
    brain = case.brain_mask()
    lo, hi = _mask_extent_lps(brain, case.grid)
    tumour = case.tumour if case.tumour is not None else np.zeros(case.grid.shape, np.uint8)
    counts = {name: int(np.count_nonzero(tumour == label)) for name, label in
              (("NCR", Label.NCR), ("ED", Label.ED), ("ET", Label.ET))}
    info = CaseInfo(case.case_id, folder, case.convention, case_sha256(case), (lo + hi) / 2.0,
                    hi - lo + np.asarray(case.grid.spacing), counts, tumour_sha256(tumour))
    return info, case


def _antialiased(image: np.ndarray, brain: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """Downsample inside the brain without aliasing or darkened edges.

    Normalised convolution: the image (zero outside the brain) and the brain mask
    are smoothed with the same Gaussian (FWHM = the spacing being added), both are
    resampled linearly, and their ratio is kept inside the nearest-resampled brain.
    """
    fine, coarse = min(source.spacing), min(target.spacing)
    brain_t = resample(source.image(brain.astype(np.uint8)), target, label=True) > 0
    if coarse <= fine * 1.01:
        out = resample(source.image(np.where(brain, image, 0).astype(np.float32)), target, label=False)
        return np.where(brain_t, np.maximum(out, 0), 0).astype(np.float32)
    sigma = float(np.sqrt(coarse ** 2 - fine ** 2) / 2.3548)
    smooth = lambda a: sitk.SmoothingRecursiveGaussian(source.image(a.astype(np.float32)), sigma)  # noqa: E731
    num = resample(smooth(np.where(brain, image, 0)), target, label=False)
    den = resample(smooth(brain), target, label=False)
    out = np.where(brain_t & (den > 1e-3), num / np.maximum(den, 1e-3), 0)
    return np.maximum(out, 0).astype(np.float32)


def write_study_case(case: Case, info: CaseInfo, grid: StudyGrid, folder: Path) -> Path:
    """Resample a real case onto its study grid and write it as a BraTS 2021 case folder (atomically)."""
    target = grid.grid_at(info.centre_lps)
    name = info.case_id
    brain = case.brain_mask()
    with atomic_directory(folder, overwrite=True) as tmp:
        for modality in MODALITIES:
            array = _antialiased(case.images[modality], brain, case.grid, target)
            write_image(target.image(array), tmp / f"{name}_{modality}.nii.gz")
        tumour = case.tumour if case.tumour is not None else np.zeros(case.grid.shape, np.uint8)
        seg = resample(case.grid.image(tumour.astype(np.uint8)), target, label=True)
        write_image(target.image(schema_to_tumour(seg.astype(np.uint8), "brats2021")), tmp / f"{name}_seg.nii.gz")
        write_json({"source_sha256": info.sha256, "grid": target.to_json(), "prep_version": PREP_VERSION},
                   tmp / "study_case.json")
    return folder


@dataclass
class RealCase:
    """A real case on its study grid: images in scanner units and its 7-class label map."""

    case_id: str
    sha256: str
    labelmap: LabelMap
    images: np.ndarray  # (4, k, j, i) float32, modalities in MODALITIES order

    @property
    def brain(self) -> np.ndarray:
        return np.any(self.images > 0, axis=0)


def load_study_case(folder: Path, case_id: str, sha: str, prepared_cache: Path) -> RealCase:
    """Read a study case folder; its label map comes from the GAN's prepared-case cache.

    :func:`~MedSynthLib.training.data.prepare_volume` derives the anatomy once and
    caches it cropped to the brain box (4 voxels of margin); the box is recomputed
    here from the same brain mask so the map is placed back on the full grid.
    """
    from ..cases.anatomy import derive_label_map
    from ..schema.grid import mask_box
    from ..training.data import prepare_volume

    case = read_case(folder, require_segmentation=True)
    volume = prepare_volume(folder, prepared_cache)
    box = mask_box(case.brain_mask(), margin=4)
    labels = np.zeros(case.grid.shape, np.uint8)
    if tuple(b.stop - b.start for b in box) == volume.labels.shape:
        labels[box] = volume.labels
    else:  # the cache layout changed under us: derive directly
        labels = derive_label_map(case).array
    images = np.stack([case.images[m] for m in MODALITIES]).astype(np.float32)
    return RealCase(case_id, sha, LabelMap(labels, case.grid), images)


# --- extra tumour label maps -------------------------------------------------------------------


def find_label_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p))
            if not found:
                raise InputError(path, "no label-map images in this --extra-labels folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(path, "--extra-labels: no such file or folder")
    return files


@dataclass
class ExtraTumour:
    """A real tumour without images (a segmentation only), on a coarse grid of its own."""

    name: str
    sha256: str
    labelmap: LabelMap  # tumour labels only, background elsewhere
    tumour_sha256: str = ""
    patients: tuple[str, ...] = ()  # real cases with the identical tumour label map (the same patient)

    def to_json(self) -> dict[str, Any]:
        counts = {n: int(np.count_nonzero(self.labelmap.array == v)) for n, v in
                  (("NCR", Label.NCR), ("ED", Label.ED), ("ET", Label.ET))}
        return {"file": self.name, "sha256": self.sha256, "voxels_on_study_spacing": counts,
                "same_patient_as": list(self.patients)}


def load_extra_tumour(path: Path, convention: str, spacing: float) -> ExtraTumour:
    """Read a tumour segmentation, map it to the schema and resample it to ``spacing`` (nearest)."""
    image = read_image(path)
    seg = sitk.GetArrayFromImage(image)
    try:
        tumour = tumour_to_schema(seg, convention)
    except LabelValueError as exc:
        raise InputError(path, f"{exc} (--extra-label-convention)") from None
    if not (tumour > 0).any():
        raise InputError(path, "extra label map holds no tumour voxel")
    source = Grid.from_image(image)
    lo, hi = _mask_extent_lps(tumour > 0, source)
    pad = 3 * spacing
    size = np.ceil((hi - lo + 2 * pad) / spacing).astype(int) + 1
    grid = Grid(tuple(int(v) for v in size), (spacing,) * 3, tuple(float(v) for v in lo - pad), IDENTITY)  # type: ignore[arg-type]
    array = resample(source.image(tumour.astype(np.uint8)), grid, label=True).astype(np.uint8)
    if not (array > 0).any():
        raise InputError(path, f"the tumour vanishes at the study spacing of {spacing} mm")
    return ExtraTumour(strip_image_suffix(path.name), files_sha256([path]), LabelMap(array, grid),
                       tumour_sha256(tumour))


# --- the healthy template on the study grid ----------------------------------------------------


def template_on_study_grid(grid: StudyGrid, mean_extent_mm: np.ndarray) -> tuple[LabelMap, dict[str, Any]]:
    """The ICBM152 label map, scaled so its brain box matches the real cases' mean brain box."""
    from ..cases.template import TEMPLATE_NAME, template_label_map

    template = template_label_map()
    lo, hi = _mask_extent_lps(template.array > 0, template.grid)
    extent = hi - lo + np.asarray(template.grid.spacing)
    scale = extent / np.asarray(mean_extent_mm, float)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(scale[0]), 0, 0, 0, float(scale[1]), 0, 0, 0, float(scale[2])])
    transform.SetTranslation([float(v) for v in (lo + hi) / 2.0])
    target = grid.grid_at(np.zeros(3))
    array = resample(template.image(), target, label=True, transform=transform).astype(np.uint8)
    # The history stays empty: a synthetic case's history then holds exactly its replayable edits.
    labelmap = LabelMap(array, target, [])
    return labelmap, {"name": TEMPLATE_NAME, "scale_to_mean_brain": [round(float(s), 4) for s in scale]}


# --- synthetic label maps ----------------------------------------------------------------------

SYNTHETIC_KINDS = ("transform", "insert", "template", "parametric")


@dataclass
class SyntheticSpec:
    """One synthetic label map and how it was made (edit records replay it)."""

    index: int
    kind: str
    base: str  # case id of the training brain, or the template name
    labelmap: LabelMap
    seed: int
    source: str | None = None
    notes: list[str] = field(default_factory=list)

    base_labels_sha256: str = ""

    def provenance(self) -> dict[str, Any]:
        """Replayable: ``replay(base label map, edits, sources)`` rebuilds the label map exactly."""
        return {"index": self.index, "kind": self.kind, "base": self.base,
                "base_labels_sha256": self.base_labels_sha256, "tumour_source": self.source, "seed": self.seed,
                "grid": self.labelmap.grid.to_json(), "edits": self.labelmap.history, "notes": self.notes}


def short_hash(array: np.ndarray) -> str:
    from ..schema.provenance import array_sha256

    return "sha256:" + array_sha256(array)[:16]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def make_synthetic_labelmaps(train: list[tuple[str, LabelMap]], extras: list[ExtraTumour], template: LabelMap | None,
                             template_name: str, config: dict[str, Any], seed: int) -> list[SyntheticSpec]:
    """``per_case`` synthetic label maps per training case, cycling through ``kinds``.

    * ``transform``: the case's own tumour moved / rotated / resized / flipped
      (:class:`~MedSynthLib.edits.RandomTumourEdit` without new tumours);
    * ``insert``: a tumour of another training case (or of an extra label map)
      inserted into this case's brain, then randomly transformed;
    * ``template``: a training case's tumour inserted into the healthy template;
    * ``parametric``: a new parametric tumour drawn in this case's brain.

    A draw that cannot be carried out is retried with the next seed (up to 10
    times), then falls back to ``transform``; the notes say so.
    """
    from ..edits import InsertTumour, RandomTumourEdit

    kinds = list(config.get("kinds", ["transform", "insert", "template"]))
    per_case = int(config.get("per_case", 1))
    edit_params = dict(config.get("edit", {}))
    transform_edit = RandomTumourEdit(**dict(edit_params, p_parametric=0.0))
    parametric_edit = RandomTumourEdit(**dict(edit_params, p_parametric=1.0))
    with_tumour = [lm for _, lm in train if tumour_mask(lm.array).any()]
    pool: list[tuple[str, LabelMap, bool]] = [(short_hash(lm.array), lm, True) for lm in with_tumour]
    pool += [(f"sha256:{e.sha256[:16]}", e.labelmap, False) for e in extras]
    specs: list[SyntheticSpec] = []
    for i, (case_id, base_map) in enumerate(train):
        for j in range(per_case):
            index = i * per_case + j
            kind = kinds[index % len(kinds)]
            notes: list[str] = []
            result = None
            for attempt in range(10):
                s = _seed(seed, i, j, attempt)
                rng = np.random.default_rng(s)
                try:
                    if kind == "transform":
                        result = (transform_edit(base_map, s), case_id, None)
                    elif kind == "parametric":
                        result = (parametric_edit(base_map, s), case_id, None)
                    elif kind == "insert":
                        others = [p for p in pool if p[1] is not base_map] or pool
                        if not others:
                            raise EditError("no tumour to insert")
                        name, source, has_brain = others[int(rng.integers(len(others)))]
                        centre = None if has_brain else tuple(float(v) for v in lps_to_ras(_tumour_centre(source)))
                        edited = InsertTumour(centre_ras_mm=centre, source=name)(base_map, source)
                        edited = transform_edit(edited, s)
                        result = (edited, case_id, name)
                    elif kind == "template":
                        if template is None:
                            raise EditError("no template")
                        brains = [p for p in pool if p[2]]
                        if not brains:
                            result = (parametric_edit(template, s), template_name, None)
                        else:
                            name, source, _ = brains[(i + j + attempt) % len(brains)]
                            edited = InsertTumour(source=name)(template, source)
                            result = (transform_edit(edited, s), template_name, name)
                    else:  # pragma: no cover - validated with the config
                        raise EditError(f"unknown kind {kind}")
                    break
                except EditError as exc:
                    notes.append(f"attempt {attempt} ({kind}): {exc}")
                    result = None
            if result is None:
                s = _seed(seed, i, j, 99)
                kind = "transform"
                result = (transform_edit(base_map, s), case_id, None)
                notes.append("fell back to transform")
            labelmap, base, source_name = result
            base_hash = short_hash((template if base == template_name and template is not None else base_map).array)
            specs.append(SyntheticSpec(index, kind, base, labelmap, s, source_name, notes, base_hash))
    return specs


def _tumour_centre(labelmap: LabelMap) -> np.ndarray:
    from ..edits import tumour_centre

    return tumour_centre(labelmap)


def link_cases(folders: list[Path], target: Path) -> Path:
    """A data folder holding exactly ``folders`` (symbolic links; copies where links fail)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for folder in folders:
        link = target / folder.name
        try:
            os.symlink(folder.resolve(), link, target_is_directory=True)
        except OSError:
            shutil.copytree(folder, link)
    return target


__all__ = ["StudyGrid", "CaseInfo", "RealCase", "ExtraTumour", "SyntheticSpec", "inspect_case",
           "write_study_case", "load_study_case", "find_label_files", "load_extra_tumour",
           "template_on_study_grid", "make_synthetic_labelmaps"]
