"""Typed provenance records: one code path reads, writes, validates and sanitises them.

A label map written by MedSynth carries a JSON sidecar (``labels.nii.gz`` ->
``labels.json``, :class:`LabelMapRecord`) with the schema version and the ordered
history of the steps that made it: how its anatomy was derived and every tumour
edit with its exact parameters, so the map can be replayed.  A synthetic case
folder carries ``provenance.json`` (:class:`SynthesisRecord`), an export its own
``provenance.json`` (the synthesis record sanitised, plus :class:`ExportRecord`).

Every step of a history is a dataclass registered in :data:`RECORD_KINDS` under the
name it is written with (``derive_labels``, ``translate``, ..., the Slicer module's
``tumour_from_segmentation`` and ``manual_segment_edit``).  Its fields are typed:
numbers, booleans, 3-vectors, and strings only from a closed set of values
(:class:`OneOf`) or a strict pattern (:class:`Pattern`).  :func:`parse_step` turns a
JSON record into its dataclass, dropping (and counting) every field or value that is
not of its type; :meth:`StepRecord.to_json` writes it back, with ``for_export=True``
leaving out the fields that may name a real case (``local_only``).  So what may leave
MedSynth is an allow-list of typed fields, not a filter on key names: a free token
(a case name, a person's name, a path) has no field it could travel in.

Older files (written before these records were typed) read the same way: their
records have the same names and parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Annotated, Any, Callable, ClassVar, Literal, Mapping, Union, get_args, get_origin,
                    get_type_hints)

import numpy as np

from .. import __version__
from .labels import CONVENTIONS, SCHEMA_VERSION, Label

# --- files and hashes -------------------------------------------------------------------------


def sidecar_path(image_path: str | Path) -> Path:
    """``out/labels.nii.gz`` -> ``out/labels.json``."""
    from .volume_io import strip_image_suffix

    path = Path(image_path)
    return path.with_name(strip_image_suffix(path.name) + ".json")


def array_sha256(array: np.ndarray) -> str:
    """Content hash of a label map (shape, dtype and voxels)."""
    digest = hashlib.sha256()
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SOFTWARE_PACKAGES = ("numpy", "scipy", "SimpleITK", "torch", "monai", "nilearn")


def software_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"medsynth": __version__, "python": platform.python_version()}
    for package in SOFTWARE_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


# --- value types --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OneOf:
    """A string field that may only hold one of these values."""

    values: frozenset[str]


@dataclass(frozen=True)
class Pattern:
    """A string field that must match this pattern in full."""

    regex: str


class LabelCounts:
    """A ``{label name: int}`` field (keys only from the label schema)."""


class Unchecked:
    """A JSON value kept in a local file as written but never exported (free text, source ids)."""


Vec3 = tuple[float, float, float]
SHA256 = Annotated[str, Pattern(r"[0-9a-f]{64}")]
#: Versions like 2.13.0, 1.26.4, 2.13.0+cpu, 0.28.2rc1: no free token can pass.
VERSION = Annotated[str, Pattern(r"\d{1,4}(\.\d{1,4}){0,3}((a|b|rc|\.post|\.dev)\d{1,4})?(\+(cpu|cu\d{2,3}|rocm[\d.]{1,8}))?")]
DEVICE = Annotated[str, Pattern(r"cpu|mps|cuda(:\d{1,2})?")]
TIMESTAMP = Annotated[str, Pattern(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?([+-]\d{2}:\d{2}|Z)?")]
LABEL_CONVENTION = Annotated[str, OneOf(frozenset(CONVENTIONS))]
#: Case-folder conventions of ``cases/readers.py`` plus the Slicer scene.
CASE_CONVENTION = Annotated[str, OneOf(frozenset(CONVENTIONS) | {"toolkit", "explicit", "slicer-scene"})]
#: Healthy canvases MedSynth ships (``cases/template.py``).
TEMPLATE_NAMES = frozenset({"ICBM152-2009a-sym"})
#: Anatomy models of ``cases/anatomy.py``; a new model adds its name here to be exported.
ANATOMY_MODEL_NAMES = frozenset({"atlas-em", "kmeans-gaussian-mrf"})
#: Contrasts an anatomy model may fit.
CONTRAST = Annotated[str, OneOf(frozenset({"t1", "t1ce", "t2", "flair"}))]
#: Review ratings: 0 = not rated, 1 (poor) .. 5 (indistinguishable from real).  The Slicer module and
#: the export both use this range.
RATING_NOT_RATED = 0
RATING_RANGE = (0, 5)
REVIEW_NOTE_MAX_CHARS = 500


class _Dropped(Exception):
    """A value that is not of its field's type (counted, never copied)."""


class Redactions:
    """Counts the fields and values a parse or sanitise dropped."""

    def __init__(self) -> None:
        self.count = 0

    def drop(self, n: int = 1) -> None:
        self.count += n


def _coerce(value: Any, annotation: Any, redacted: Redactions) -> Any:
    """``value`` as ``annotation`` or :class:`_Dropped`; nested records drop field by field."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extras = get_args(annotation)
        for extra in extras:
            if isinstance(extra, OneOf):
                if not isinstance(value, str) or value not in extra.values:
                    raise _Dropped
                return value
            if isinstance(extra, Pattern):
                if not isinstance(value, str) or not re.fullmatch(extra.regex, value):
                    raise _Dropped
                return value
        return _coerce(value, base, redacted)
    if annotation is Unchecked:
        return value
    if annotation is LabelCounts:
        if not isinstance(value, dict):
            raise _Dropped
        names = {label.name for label in Label}
        out = {}
        for key, count in value.items():
            if key in names and isinstance(count, int) and not isinstance(count, bool):
                out[key] = count
            else:
                redacted.drop()
        return out
    if origin is Union or origin is types.UnionType:
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, redacted)
    if origin is Literal:
        if value not in get_args(annotation) or isinstance(value, bool):
            raise _Dropped
        return value
    if origin is tuple:
        args = get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise _Dropped
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], redacted) for v in value)
        if len(value) != len(args):
            raise _Dropped
        return tuple(_coerce(v, a, redacted) for v, a in zip(value, args))
    if origin is dict:
        key_type, value_type = get_args(annotation)
        if not isinstance(value, dict):
            raise _Dropped
        out = {}
        for key, item in value.items():
            try:
                out[_coerce(key, key_type, redacted)] = _coerce(item, value_type, redacted)
            except _Dropped:
                redacted.drop()
        return out
    if annotation is bool:
        if not isinstance(value, bool):
            raise _Dropped
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Dropped
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Dropped
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise _Dropped
        return _build(annotation, value, redacted)
    raise TypeError(f"provenance field type {annotation!r} has no rule")  # a programming error


def _build(cls: type, data: Mapping[str, Any], redacted: Redactions) -> Any:
    """An instance of the record dataclass ``cls`` from JSON, field by field."""
    hints = get_type_hints(cls, include_extras=True)
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        try:
            values[f.name] = _coerce(data[f.name], hints[f.name], redacted)
        except _Dropped:
            redacted.drop()
    redacted.drop(sum(1 for key in data if key not in names))
    return cls(**values)


def _to_json(value: Any, for_export: bool) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hidden = getattr(value, "local_only", frozenset()) if for_export else frozenset()
        return {f.name: _to_json(getattr(value, f.name), for_export) for f in dataclasses.fields(value)
                if f.name not in hidden}
    if isinstance(value, tuple):
        return [_to_json(v, for_export) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v, for_export) for k, v in value.items()}
    return value



def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    """Parameters without the fields a record did not set (nested records too)."""
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}


# --- step records (the history of a label map) ------------------------------------------------

#: Record name -> dataclass of its parameters.
RECORD_KINDS: dict[str, type["StepParams"]] = {}


def record_kind(name: str):
    """Register a parameter dataclass under the record name it is written with."""

    def register(cls: type["StepParams"]) -> type["StepParams"]:
        cls.record_name = name
        RECORD_KINDS[name] = cls
        return cls

    return register


@dataclass(frozen=True)
class StepParams:
    """The typed parameters of one step; subclasses are the record kinds."""

    record_name: ClassVar[str] = ""
    #: Fields kept in local files (needed to replay) but never exported: they may name a real case.
    local_only: ClassVar[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class AnatomyModelParams:
    name: Annotated[str, OneOf(ANATOMY_MODEL_NAMES)] | None = None
    beta: float | None = None
    iterations: int | None = None
    exclude_margin_mm: float | None = None
    bias_correction: bool | None = None
    max_samples: int | None = None
    peritumour_mm: float | None = None
    # the atlas-prior EM model (cases/atlas_anatomy.py)
    contrasts: tuple[CONTRAST, ...] | None = None
    use_t1ce: bool | None = None
    n4_spacing_mm: float | None = None
    n4_levels: int | None = None
    n4_iterations: int | None = None
    edge_t2_level: float | None = None
    registration_spacing_mm: float | None = None
    registration_sampling: float | None = None
    registration_seed: int | None = None
    affine_iterations: int | None = None
    bspline_spacing_mm: float | None = None
    bspline_iterations: int | None = None
    prior_floor: float | None = None
    prior_weight: float | None = None
    fit_prior_weight: float | None = None
    tied_covariance: bool | None = None
    edge_mm: float | None = None
    em_iterations: int | None = None
    mrf_iterations: int | None = None
    min_brain_dice: float | None = None


@dataclass(frozen=True)
class AnatomyFallbackParams:
    """Why the anatomy came from another model than the one asked for (``anatomy_model`` names the one that ran)."""

    requested_model: Annotated[str, OneOf(ANATOMY_MODEL_NAMES)] | None = None
    reason: Literal["missing_contrasts"] | None = None
    missing_contrasts: tuple[CONTRAST, ...] | None = None


@record_kind("derive_labels")
@dataclass(frozen=True)
class DeriveLabelsParams(StepParams):
    """Anatomy derived from a real case's T1; tumour copied from its expert segmentation (``tumour_segmentation``:
    whether the case had one; without it a tumour in the scan is labelled as tissue)."""

    convention: CASE_CONVENTION | None = None
    label_convention: LABEL_CONVENTION | None = None
    anatomy_model: AnatomyModelParams | None = None
    anatomy_contrasts: tuple[CONTRAST, ...] | None = None
    anatomy_fallback: AnatomyFallbackParams | None = None
    tumour_segmentation: bool | None = None


@record_kind("template_labels")
@dataclass(frozen=True)
class TemplateLabelsParams(StepParams):
    """The healthy template's own label map."""

    template: Annotated[str, OneOf(TEMPLATE_NAMES)] | None = None
    anatomy_model: AnatomyModelParams | None = None


@record_kind("translate")
@dataclass(frozen=True)
class TranslateParams(StepParams):
    offset_ras_mm: Vec3 | None = None
    applied_offset_ras_mm: Vec3 | None = None  # the whole-voxel offset moved (offset_ras_mm is the request)
    clipped_tumour_voxels: LabelCounts | None = None  # tumour voxels per class the move pushed out of the brain


@record_kind("rotate")
@dataclass(frozen=True)
class RotateParams(StepParams):
    angles_deg: Vec3 | None = None


@record_kind("scale")
@dataclass(frozen=True)
class ScaleParams(StepParams):
    factors: Vec3 | None = None


@record_kind("flip")
@dataclass(frozen=True)
class FlipParams(StepParams):
    axis: Literal["LR", "AP", "SI"] | None = None
    about: Literal["tumour", "brain"] | None = None
    clipped_tumour_voxels: LabelCounts | None = None  # tumour voxels per class the flip put outside the brain


@record_kind("insert_tumour")
@dataclass(frozen=True)
class InsertTumourParams(StepParams):
    """``source`` names where the tumour came from (for replay), ``source_labels_sha256`` its content: never
    exported (a file name, or a hash matching a patient's map, may identify the patient)."""

    local_only: ClassVar[frozenset[str]] = frozenset({"source", "source_labels_sha256"})
    centre_ras_mm: Vec3 | None = None
    center_ras_mm: Vec3 | None = None  # the spelling of records written before the rename
    keep_existing: bool | None = None
    source: Unchecked | None = None
    source_labels_sha256: SHA256 | None = None


@record_kind("parametric_tumour")
@dataclass(frozen=True)
class ParametricTumourParams(StepParams):
    centre_ras_mm: Vec3 | None = None
    center_ras_mm: Vec3 | None = None  # the spelling of records written before the rename
    radii_mm: Vec3 | None = None
    rim_mm: float | None = None
    necrosis: bool | None = None
    oedema_mm: float | None = None
    irregularity: float | None = None
    seed: int | None = None
    keep_existing: bool | None = None


@record_kind("random_tumour")
@dataclass(frozen=True)
class RandomTumourParams(StepParams):
    """A random tumour edit's draw: the sampler's seed and options (the draw made again from them); the
    ``drawn_edits`` records after it are the edits it drew, which replay on their own."""

    seed: int | None = None
    translate_mm: float | None = None
    rotate_deg: float | None = None
    scale_range: tuple[float, float] | None = None
    p_flip: float | None = None
    flip_about: Literal["tumour", "brain"] | None = None
    p_parametric: float | None = None
    radius_fraction: tuple[float, float] | None = None
    max_tries: int | None = None
    drawn_edits: int | None = None


@record_kind("tumour_from_segmentation")
@dataclass(frozen=True)
class TumourFromSegmentationParams(StepParams):
    """The Slicer module: a loaded or drawn tumour segmentation put into the template."""

    label_convention: LABEL_CONVENTION | None = None


@record_kind("manual_segment_edit")
@dataclass(frozen=True)
class ManualSegmentEditParams(StepParams):
    """Segment Editor strokes taken by the Slicer module: counts only.  ``tumour_drawn_voxels``: voxels the strokes
    made tumour or gave another tumour class (a hand-drawn tumour may be traced from a patient's segmentation)."""

    changed_voxels: int | None = None
    voxel_change: LabelCounts | None = None
    tumour_drawn_voxels: int | None = None


@dataclass(frozen=True)
class StepRecord:
    """One entry of a label map's history: ``{"name", "params", "schema_version"}``."""

    name: str
    params: StepParams | None
    schema_version: int = SCHEMA_VERSION

    @property
    def recognised(self) -> bool:
        return self.params is not None

    def to_json(self, for_export: bool = False) -> dict[str, Any]:
        if self.params is None:
            return {"name": "unrecognised", "params": {}, "schema_version": self.schema_version}
        params = _drop_none(_to_json(self.params, for_export))
        return {"name": self.name, "params": params, "schema_version": self.schema_version}


def parse_step(raw: Any, redacted: Redactions | None = None) -> StepRecord:
    """A history record as its typed dataclass (``params`` None for an unknown kind)."""
    redacted = redacted if redacted is not None else Redactions()
    if not isinstance(raw, dict) or raw.get("name") not in RECORD_KINDS:
        redacted.drop()
        return StepRecord("unrecognised", None)
    cls = RECORD_KINDS[raw["name"]]
    params = raw.get("params", {})
    if not isinstance(params, dict):
        redacted.drop()
        params = {}
    version = raw.get("schema_version", SCHEMA_VERSION)
    redacted.drop(sum(1 for key in raw if key not in ("name", "params", "schema_version")))
    return StepRecord(raw["name"], _build(cls, params, redacted),
                      version if isinstance(version, int) and not isinstance(version, bool) else SCHEMA_VERSION)


def parse_history(raw: Any, redacted: Redactions | None = None) -> list[StepRecord]:
    redacted = redacted if redacted is not None else Redactions()
    if not isinstance(raw, list):
        if raw is not None:
            redacted.drop()
        return []
    return [parse_step(item, redacted) for item in raw]


# --- privacy: how close a label map stays to the real case it came from ---------------------------

#: ``--anonymous`` refuses a case whose tumour overlaps the source patient's own tumour (in place) at this Dice or more.
MAX_ANONYMOUS_TUMOUR_DICE = 0.2


def _dice_from_distance(distance: float) -> float:
    jaccard = 1.0 - distance
    return 2 * jaccard / (1 + jaccard) if jaccard > 0 else 0.0


def _distance_from_dice(dice: float) -> float:
    return 1.0 - dice / (2.0 - dice)


def _jaccard_distance_in_box(before: np.ndarray, after: np.ndarray, box: tuple[slice, ...],
                             mask: Callable[[np.ndarray], np.ndarray]) -> float:
    """Jaccard distance (1 - intersection / union) of ``mask(before)`` and ``mask(after)``, for label maps that
    are equal outside ``box``, counted inside the box and once over ``before``."""
    a, b = mask(before[box]), mask(after[box])
    outside = int(np.count_nonzero(mask(before))) - int(np.count_nonzero(a))  # the same voxels in both maps
    union = outside + int(np.count_nonzero(a | b))
    return 0.0 if union == 0 else 1.0 - (outside + int(np.count_nonzero(a & b))) / union


#: The tumour origin a step gives the map it makes (other steps keep the origin of the tumour they move).
_STEP_ORIGINS = {"parametric_tumour": "parametric", "insert_tumour": "inserted",
                 "tumour_from_segmentation": "segmentation"}


#: Origins that leave nothing of a patient where their tumour was: no tumour, or one MedSynth drew.
_DRAWN_ORIGINS = ("none", "parametric")


def _strokes_drew_tumour(params: Any) -> bool | None:
    """Whether a ``manual_segment_edit`` drew tumour (made voxels tumour or gave them another tumour class); None
    when its record cannot tell (a change the module did not see, or a hand-edited record)."""
    if not isinstance(params, dict):
        return None
    drawn = params.get("tumour_drawn_voxels")
    if isinstance(drawn, int) and not isinstance(drawn, bool):
        return drawn > 0
    change = params.get("voxel_change")
    if isinstance(change, dict) and "changed_voxels" in params:  # a record from before tumour_drawn_voxels
        return any(isinstance(change.get(name), int) and change[name] > 0 for name in ("NCR", "ED", "ET"))
    return None


def _origin_after(origin: str, record: Mapping[str, Any] | None) -> str:
    """The tumour origin after the step ``record`` (``keep_existing`` with another origin: ``mixed``).

    A tumour that is replaced is refilled with the nearest anatomy labels (``edits.base.healthy_anatomy``), which
    differ from the healthy brain inside its outline: set against the template that outline reads back. So a
    parametric tumour drawn over a tumour MedSynth did not draw gives ``mixed``, not ``parametric``.  Tumour drawn
    by hand (Segment Editor strokes) counts as a ``segmentation`` tumour, kept with the one there (``mixed``
    beside a parametric one); strokes that only erase change nothing; strokes the record cannot tell about make
    the origin ``unknown``.
    """
    name = record.get("name") if isinstance(record, Mapping) else None
    params = record.get("params", {}) if isinstance(record, Mapping) else {}
    if name == "manual_segment_edit":
        drew = _strokes_drew_tumour(params)
        if drew is None:
            return "unknown"
        if not drew or origin in ("segmentation", "mixed", "unknown", "patient", "inserted"):
            return origin  # patient / inserted: already a real tumour's shape, not anonymous either way
        return "segmentation" if origin == "none" else "mixed"
    keep = isinstance(params, dict) and bool(params.get("keep_existing"))
    new_origin = _STEP_ORIGINS.get(name)  # type: ignore[arg-type]
    if new_origin is None:
        return origin
    if keep:
        return new_origin if origin in ("none", new_origin) else "mixed"
    return "mixed" if new_origin == "parametric" and origin not in _DRAWN_ORIGINS else new_origin


def _origin_without_tumour(origin: str) -> str:
    """The origin of a map left with no tumour: ``none``, or ``mixed`` when the tumour it held was not MedSynth's
    (its refilled outline stays in the anatomy)."""
    return "none" if origin in _DRAWN_ORIGINS else "mixed"


@dataclass(frozen=True)
class PrivacyRecord:
    """How much of a real patient a label map still carries, measured as it was made.

    Attributes:
        anatomy: ``patient`` (CSF/GM/WM and brain outline derived from a real case's T1),
            ``template`` (the healthy ICBM152 template) or ``unknown`` (no history).
        brain_dice_to_source: Dice of the brain mask against the source patient's brain mask
            (``None`` when the anatomy is not a patient's).  Edits never move the brain
            outline, so it stays 1.0 for a patient's anatomy.
        tumour_dice_to_source: Dice of the tumour (NCR+ED+ET) against the source patient's
            own tumour, in place (``None`` without a source patient tumour).  Each edit
            measures its own change; over several edits the value is an upper bound (the
            Jaccard distance is a metric), exact after one edit.
        tumour_origin: where the current tumour came from: ``patient`` (the patient's expert
            segmentation, possibly moved), ``inserted`` (another label map's tumour: its shape
            is that case's), ``parametric``, ``segmentation`` (drawn or loaded in Slicer),
            ``mixed`` (tumours of two origins kept together, or a tumour MedSynth did not draw replaced
            or erased: the anatomy refilled in its place keeps its outline), ``none`` or ``unknown``.
    """

    anatomy: Literal["patient", "template", "unknown"] = "unknown"
    brain_dice_to_source: float | None = None
    tumour_dice_to_source: float | None = None
    tumour_origin: Literal["patient", "inserted", "parametric", "segmentation", "mixed", "none",
                           "unknown"] = "unknown"
    #: ``synthetic`` (every voxel painted by the network) or ``patient`` (a real scan with a region inpainted:
    #: outside the region the images are the patient's own, :class:`InpaintingRecord`).
    images: Literal["synthetic", "patient"] = "synthetic"

    @classmethod
    def from_history(cls, history: list[dict[str, Any]], array: np.ndarray) -> "PrivacyRecord":
        """The state of a map whose first record says how it began (later steps unmeasured)."""
        start = history[0].get("name") if history and isinstance(history[0], dict) else None
        has_tumour = bool((array >= Label.NCR).any())
        if start == "derive_labels":
            # Later steps unmeasured: the bound of an unedited map (edits keep the brain outline).
            unedited = len(history) == 1
            return cls("patient", 1.0, 1.0 if has_tumour else None,
                       "patient" if has_tumour and unedited else ("none" if unedited else "unknown"))
        if start == "template_labels":
            origin = "none"
            for record in history[1:]:  # where the tumour came from is in the history: no measuring needed
                name = record.get("name") if isinstance(record, Mapping) else None
                origin = _origin_after(origin, record) if name in RECORD_KINDS else "unknown"
            return cls("template", None, None, origin if has_tumour else _origin_without_tumour(origin))
        return cls("unknown", None, None, "unknown")

    def after_step(self, before: np.ndarray, after: np.ndarray, record: Mapping[str, Any] | None,
                   changed: tuple[slice, ...] | None = None) -> "PrivacyRecord":
        """The state after one step turned ``before`` into ``after`` (both label arrays).

        Args:
            changed: a box outside which the two maps are equal (:meth:`LabelMap.with_array` passes the box of
                the voxels that changed: an edit's box is a small part of the volume); ``None``: the whole array.
                Each mask is compared inside it and counted once over ``before``.
        """
        box = tuple(slice(None) for _ in np.shape(before)) if changed is None else changed
        brain = self.brain_dice_to_source
        if brain is not None:
            step = _jaccard_distance_in_box(before, after, box, lambda labels: labels > Label.BACKGROUND)
            brain = round(_dice_from_distance(abs(_distance_from_dice(brain) - step)), 4)
        tumour_dice = self.tumour_dice_to_source
        if tumour_dice is not None:
            step = _jaccard_distance_in_box(before, after, box, lambda labels: labels >= Label.NCR)
            tumour_dice = round(_dice_from_distance(abs(_distance_from_dice(tumour_dice) - step)), 4)
        origin = _origin_after(self.tumour_origin, record)
        if not (after >= Label.NCR).any():
            origin = _origin_without_tumour(origin)
        return PrivacyRecord(self.anatomy, brain, tumour_dice, origin, self.images)

    def anonymous(self) -> tuple[bool, str]:
        """Whether ``export --anonymous`` may share the case, and why (one phrase)."""
        if self.images == "patient":
            return False, ("its images are the patient's own scan outside the inpainted region (a tumour edited "
                           "into a real case), and a whole synthetic case from its label map keeps the patient's "
                           "anatomy; to share a case, synthesise one from the healthy template brain with a "
                           "parametric tumour")
        if self.anatomy == "unknown":
            return False, "its label map has no history, so its source is unknown"
        if self.anatomy == "patient":
            # Edits never move the brain outline, so a patient's anatomy stays that patient's whatever Dice a record
            # holds; a record without the measurement is no evidence of anything else.
            dice = self.brain_dice_to_source
            measured = "not recorded" if dice is None else f"{dice:.2f}"
            return False, f"its anatomy is the source patient's own (brain-mask Dice to that patient {measured})"
        if self.tumour_dice_to_source is not None and self.tumour_dice_to_source >= MAX_ANONYMOUS_TUMOUR_DICE:
            return False, (f"its tumour overlaps the source patient's own tumour (Dice up to "
                           f"{self.tumour_dice_to_source:.2f} >= {MAX_ANONYMOUS_TUMOUR_DICE})")
        if self.tumour_origin == "mixed":
            return False, ("its label map holds, or held, a tumour MedSynth did not draw, whose shape identifies that "
                           "patient wherever it is placed (the anatomy refilled where a tumour was replaced keeps its "
                           "outline); draw a parametric tumour in a fresh template instead")
        if self.tumour_origin == "inserted":
            # A real tumour's shape identifies its patient wherever it is placed: the study's shape
            # attack (study/reidentification.py) re-identified 25 of 26 patient tumours put into the
            # template after a random edit, once aligned by a similarity transform.
            return False, ("its tumour is another label map's tumour, whose shape identifies that patient "
                           "wherever it is placed; draw a parametric tumour instead")
        if self.tumour_origin == "segmentation":
            return False, ("its tumour is a segmentation loaded or drawn in Slicer, which may be a patient's expert "
                           "segmentation (its shape identifies that patient); draw a parametric tumour instead")
        if self.tumour_origin == "unknown":
            return False, "where its tumour came from is not recorded; draw a parametric tumour instead"
        return True, f"{self.anatomy} anatomy, {self.tumour_origin} tumour"

    def statement(self) -> str:
        """One sentence for README.txt and DICOM comments."""
        ok, reason = self.anonymous()
        brain = "n/a" if self.brain_dice_to_source is None else f"{self.brain_dice_to_source:.2f}"
        tumour = "n/a" if self.tumour_dice_to_source is None else f"{self.tumour_dice_to_source:.2f}"
        images = "images the patient's own scan outside the inpainted region; " if self.images == "patient" else ""
        return (f"Privacy: {images}anatomy {self.anatomy}; brain-mask Dice to source patient {brain}; tumour Dice to "
                f"source patient {tumour}; tumour {self.tumour_origin}; "
                f"{'anonymous' if ok else 'NOT anonymous'} ({reason}).")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any, redacted: Redactions | None = None) -> "PrivacyRecord | None":
        if raw is None:
            return None
        redacted = redacted if redacted is not None else Redactions()
        if not isinstance(raw, dict):
            redacted.drop()
            return None
        return _build(cls, raw, redacted)


def privacy_of(labelmap: Any) -> PrivacyRecord:
    """The measured privacy of a :class:`~MedSynthLib.schema.grid.LabelMap` (inferred when untracked)."""
    tracked = getattr(labelmap, "privacy", None)
    if isinstance(tracked, PrivacyRecord):
        return tracked
    return PrivacyRecord.from_history(labelmap.history, labelmap.array)


# --- whole-file records -------------------------------------------------------------------------

LABEL_MAP_KIND = "medsynth-label-map"
SYNTHETIC_CASE_KIND = "medsynth-synthetic-case"


def label_map_record(history: list[dict[str, Any]], array: np.ndarray,
                     privacy: PrivacyRecord | None = None) -> dict[str, Any]:
    """The sidecar written beside a label map."""
    record = {
        "kind": LABEL_MAP_KIND,
        "schema_version": SCHEMA_VERSION,
        "labels_sha256": array_sha256(array),
        "history": history,
        "software": software_versions(),
    }
    if privacy is not None:
        record["privacy"] = privacy.to_json()
    return record


@dataclass(frozen=True)
class ModelRecord:
    """The model that painted a case: its weights' sha256 and its config's (``config_sha256``: the intensity
    statistics and the appearance prior change the images too; models may share weights and differ in config)."""

    name: Unchecked | None = None
    sha256: SHA256 | None = None
    config_sha256: SHA256 | None = None


@dataclass(frozen=True)
class InferencePass:
    """How one pass of the network ran.  Sliding windows blend overlapping outputs and give other images than one
    whole-volume pass, so the path taken (after a GPU out-of-memory too) is needed to make the case again.

    Attributes:
        part: ``direct`` (the label map) or ``mirrored`` (its left-right mirror, for the mirror average).
        rerender: the pass re-rendered an edited region of the case (not the whole brain box).
        method: ``whole-volume`` (the padded brain box in one piece) or ``sliding-window``.
        window: the sliding window's size in voxels, in the network's (training) axis order.
        overlap: the windows' overlap (fraction of the window).
        blending: how overlapping windows are blended.
        device, precision: where and how this pass ran (a fallback to the CPU changes both).
        out_of_memory_retries: GPU out-of-memory errors before this path ran (each one took a smaller path).
    """

    part: Literal["direct", "mirrored"] | None = None
    rerender: bool | None = None
    method: Literal["whole-volume", "sliding-window"] | None = None
    window: tuple[int, int, int] | None = None
    overlap: float | None = None
    blending: Literal["gaussian"] | None = None
    device: DEVICE | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    out_of_memory_retries: int | None = None


@dataclass(frozen=True)
class ReviewRecord:
    """A clinician's rating of a synthetic case.  The note is free text: kept locally, never exported."""

    local_only: ClassVar[frozenset[str]] = frozenset({"note"})
    rating: int = RATING_NOT_RATED
    note: Unchecked | None = None
    reviewed_at: TIMESTAMP | None = None

    @classmethod
    def from_json(cls, raw: Any, redacted: Redactions) -> "ReviewRecord | None":
        if raw is None:
            return None
        if not isinstance(raw, dict):
            redacted.drop()
            return None
        review = _build(cls, raw, redacted)
        if "rating" not in raw or review.rating != raw.get("rating") or \
                not RATING_RANGE[0] <= review.rating <= RATING_RANGE[1]:
            redacted.drop()
            return None
        note = review.note
        if note is not None:
            note = "".join(ch for ch in str(note) if ch.isprintable() or ch in "\n\t")[:REVIEW_NOTE_MAX_CHARS]
        return dataclasses.replace(review, note=note)


TIMING_KEYS = frozenset({"load_model", "network", "total", "rerender", "write", "region"})
OUTPUT_FILES = ("t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz", "labels.nii.gz", "labels.json")
#: Written by inpainting into a real case: 1 where a voxel is (partly) synthetic, 0 where it is the real scan.
SYNTHETIC_MASK_FILE = "synthetic_mask.nii.gz"


@dataclass(frozen=True)
class InpaintingRecord:
    """A real patient's scan with one region re-rendered (``medsynth synthesize --context``).

    Outside the region every voxel is the patient's image as stored: such a case is never anonymous.

    Attributes:
        context: what the images outside the region are (always the patient's scan).
        region_margin_mm: growth of the changed tumour into the region.
        feather_mm: width of the blend inside the region's border.
        old_tumour: where the tumour before the edit came from (``old-labels``: a given label map;
            ``case-segmentation``: the case's own expert segmentation; ``label-history``: the label map's history
            (unedited, one measured edit that left the patient's tumour in place, or a patient without one);
            ``none``: written before the history was required, when nothing said it).
        old_labels_sha256: content hash of the ``old-labels`` map (:func:`array_sha256`; local only, as
            ``insert_tumour``'s ``source_labels_sha256``: a hash of the patient's own map may identify the patient).
        synthetic_voxels: voxels in the region (``synthetic_mask.nii.gz``).
        mirror_average: the network output was averaged with its left-right mirrored pass.
        match_tissue: healthy classes in the region were shifted to the patient's own medians around it.
        context_sha256: sha256 of the patient's image files (local only: it identifies the scans).
    """

    local_only: ClassVar[frozenset[str]] = frozenset({"context_sha256", "old_labels_sha256"})
    context: Literal["patient-scan"] = "patient-scan"
    region_margin_mm: float | None = None
    feather_mm: float | None = None
    old_tumour: Literal["old-labels", "case-segmentation", "label-history", "none"] | None = None
    old_labels_sha256: SHA256 | None = None
    synthetic_voxels: int | None = None
    mirror_average: bool | None = None
    match_tissue: bool | None = None
    context_sha256: dict[CONTRAST, SHA256] | None = None


@dataclass(frozen=True)
class SynthesisRecord:
    """``provenance.json`` of a synthetic case folder (typed; see :func:`SynthesisRecord.from_json`)."""

    kind: Literal["medsynth-synthetic-case"] = SYNTHETIC_CASE_KIND
    synthetic: bool = True
    label_schema_version: int = SCHEMA_VERSION
    model: ModelRecord = field(default_factory=ModelRecord)
    labels_sha256: SHA256 | None = None
    edits: tuple[StepRecord, ...] = ()
    seed: int | None = None
    #: False when the model ignores the seed (no appearance code): the seed then shaped nothing.
    seed_effective: bool | None = None
    #: The appearance code the seed stood for (models with one), exactly as the network received it.
    appearance_code: tuple[float, ...] | None = None
    #: How far the code reaches from the model's mean appearance (1: its training cases' distribution).
    appearance_spread: float | None = None
    device: DEVICE | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    #: Whether the network's output was averaged with its pass on the left-right mirrored label map.
    mirror_average: bool | None = None
    #: How each pass of the network ran, in order (whole volume or sliding windows; fallbacks included).
    inference: tuple[InferencePass, ...] | None = None
    grid: Unchecked | None = None
    software: dict[Annotated[str, OneOf(frozenset({"medsynth", "python", *SOFTWARE_PACKAGES}))], VERSION] = \
        field(default_factory=dict)
    timings_s: dict[Annotated[str, OneOf(TIMING_KEYS)], float] = field(default_factory=dict)
    privacy: PrivacyRecord | None = None
    #: sha256 of every written file of the case folder (name -> hash).
    files: dict[Annotated[str, OneOf(frozenset(OUTPUT_FILES) | {SYNTHETIC_MASK_FILE})], SHA256] | None = None
    review: ReviewRecord | None = None
    inpainting: InpaintingRecord | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], redacted: Redactions | None = None) -> "SynthesisRecord":
        """Parse a provenance.json (older ones too), dropping and counting what is not of its type."""
        redacted = redacted if redacted is not None else Redactions()
        simple = {k: v for k, v in raw.items() if k not in ("edits", "privacy", "review", "model", "inpainting")}
        record = _build(cls, simple, redacted)
        model = raw.get("model")
        if not isinstance(model, dict):
            redacted.drop(model is not None)
            model = {}
        return dataclasses.replace(
            record, model=_build(ModelRecord, model, redacted), edits=tuple(parse_history(raw.get("edits"), redacted)),
            privacy=PrivacyRecord.from_json(raw.get("privacy"), redacted),
            review=ReviewRecord.from_json(raw.get("review"), redacted),
            inpainting=_optional_record(InpaintingRecord, raw.get("inpainting"), redacted))

    def to_json(self, for_export: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "edits":
                out["edits"] = [step.to_json(for_export) for step in value]
            elif f.name in ("privacy", "review", "files", "inpainting", "seed_effective",
                            "appearance_code", "appearance_spread", "mirror_average", "inference") and value is None:
                continue
            elif f.name == "inference":
                out["inference"] = [_drop_none(_to_json(step, for_export)) for step in value]
            elif f.name == "files" and for_export:
                continue  # the case folder's own files; an export lists its own
            elif f.name == "privacy":
                out["privacy"] = value.to_json()
            elif f.name in ("review", "inpainting"):
                out[f.name] = _drop_none(_to_json(value, for_export))
            else:
                out[f.name] = _to_json(value, for_export)
        return out


def _optional_record(cls: type, raw: Any, redacted: Redactions) -> Any:
    """A nested record from JSON, or ``None`` when absent (a non-object is dropped and counted)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        redacted.drop()
        return None
    return _build(cls, raw, redacted)


@dataclass(frozen=True)
class ExportRecord:
    format: Literal["nifti", "dicom"]
    naming: Literal["brats2021", "brats2023"] | None
    case_id: str
    exported_at: str
    medsynth_version: str
    software: dict[str, str]
    removed_fields: int
    anonymous: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = [
    "RECORD_KINDS", "StepParams", "StepRecord", "PrivacyRecord", "SynthesisRecord", "InpaintingRecord",
    "SYNTHETIC_MASK_FILE", "ReviewRecord", "ExportRecord",
    "ModelRecord", "InferencePass", "Redactions",
    "parse_step", "parse_history", "privacy_of", "label_map_record", "sidecar_path",
    "array_sha256", "file_sha256", "software_versions", "RATING_RANGE", "RATING_NOT_RATED",
    "MAX_ANONYMOUS_TUMOUR_DICE",
]
