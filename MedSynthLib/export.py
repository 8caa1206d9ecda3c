"""``medsynth export``: share synthetic cases as BraTS NIfTI or DICOM, marked synthetic.

An export is built for the tools people use - BraTS pipelines, PACS and DICOM
viewers, 3D Slicer - says plainly that it is synthetic, and carries nothing that
identifies a source patient:

* every image is written fresh from its voxel array and grid; no input file is
  copied, so no NIfTI header text (``descrip``, ``aux_file``, ``intent_name``)
  and no metadata of the input travels along;
* ``provenance.json`` is rebuilt through a whitelist (:func:`sanitise_provenance`):
  model name and sha256, label-map sha256, the edit records (known parameters
  only, never a path or source identifier), seed, device, precision, software
  versions and timings.  Unknown fields are dropped, not copied;
* the case id is generated (:func:`default_case_id`), never derived from a file
  or folder name.

Layout of ``EXPORT_ROOT/<case-id>/``:

NIfTI (``--format nifti``, BraTS 2021 naming; ``--naming brats2023`` for the 2023 names)
    ``<id>_t1, _t1ce, _t2, _flair`` (2023: ``-t1n, -t1c, -t2w, -t2f``), the tumour
    labels ``<id>_seg`` in BraTS values (2021: 1 NCR, 2 ED, 4 ET; 2023: ET = 3),
    the anatomy ``<id>_anatomy`` (1 CSF, 2 GM, 3 WM; 0 outside the brain and in
    the tumour), ``provenance.json`` and ``README.txt``.

    Intensities are written, volume by volume, as **int16** (rounded), like BraTS,
    when that loses nothing that matters: the largest magnitude lies in 256..32767
    (rounding then costs under 0.2 % of it) or the voxels are already integers that
    fit.  Otherwise (tiny normalised ranges, or values beyond int16) they stay float32.

DICOM (``--format dicom``)
    ``T1/ T1ce/ T2/ FLAIR/`` - one MR Image Storage series each (``IM0001.dcm`` ...,
    one file per slice along the grid's third axis), all in one study and one
    frame of reference; ``SEG/seg.dcm`` - the tumour labels as a DICOM
    Segmentation (highdicom, BINARY, segments 1 NCR, 2 ED, 3 ET) referencing the
    T1 series; ``provenance.json``; ``README.txt``.

    Every export gets fresh UIDs.  Each file has Synthetic Data (0008,001C) YES,
    Patient Identity Removed YES with a De-identification Method that says the
    data are synthetic, a generated patient name and ID (the case id), and the
    provenance summarised in the Contributing Equipment Sequence (and, for the MR
    images, Image Comments).  The MR images have Image Type DERIVED\\SECONDARY and
    int16 pixels: the same values as the int16 NIfTI export (rescale slope 1),
    or, where the NIfTI export is float32, ``value = stored * RescaleSlope`` with
    the slope chosen so the largest magnitude fills the int16 range.  Dates and
    times are those of the export (UTC); there is no acquisition date.

    Geometry is kept exactly: position, orientation and spacing of every voxel.
    DICOM readers order slices along the normal of the image plane (row x column
    direction), so a grid whose third axis points the other way (a left-handed
    direction matrix, common in radiological-convention NIfTI) reads back with
    its slices reversed - the same voxels at the same places, indexed from the
    other end.

The case id defaults to ``SYNTH-`` and 10 hex digits of a sha256 over the case's
synthetic content (the label map and the four images): it is deterministic, so
exporting the same case again lands in the same folder (and needs
``--overwrite``), and it is computable only from the synthetic data itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import __version__
from .errors import InputError, MedSynthError, OutputExistsError
from .grid import Grid, LabelMap
from .labels import SCHEMA_VERSION, Label, schema_to_tumour

MODALITIES = ("t1", "t1ce", "t2", "flair")
FORMATS = ("nifti", "dicom")

#: File-name suffixes of the two BraTS namings; the tumour values follow the same
#: name in :data:`MedSynthLib.labels.CONVENTIONS`.
NAMINGS: Mapping[str, Mapping[str, str]] = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg",
                  "anatomy": "_anatomy"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg",
                  "anatomy": "-anatomy"},
}

#: DICOM series: folder name, series description stem, series number.
DICOM_SERIES: Mapping[str, tuple[str, str, int]] = {
    "t1": ("T1", "T1", 1),
    "t1ce": ("T1ce", "T1ce post-contrast", 2),
    "t2": ("T2", "T2", 3),
    "flair": ("FLAIR", "FLAIR", 4),
}
SEG_SERIES_NUMBER = 100

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DEIDENTIFICATION_METHOD = "Synthetic data (MedSynth): no source patient data or identifiers"
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Tumour segments of the DICOM Segmentation: number, MedSynth label, label, description.
SEG_SEGMENTS: tuple[tuple[int, Label, str, str], ...] = (
    (1, Label.NCR, "NCR", "Necrotic / non-enhancing tumour core (synthetic)"),
    (2, Label.ED, "ED", "Peritumoural oedema (synthetic)"),
    (3, Label.ET, "ET", "Enhancing tumour (synthetic)"),
)


# --- provenance --------------------------------------------------------------------------------

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: A plain token: no spaces, no path separators, no DICOM name separators.
_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")
_SAFE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Keys that may name a person, a file or a source case: dropped wherever they occur.
_UNSAFE_KEY = re.compile(r"path|file|dir|folder|source|patient|subject|mrn|uid|date|time_?stamp|user|host",
                         re.IGNORECASE)
_FILE_SUFFIX = re.compile(r"\.(nii|gz|nrrd|nhdr|mha|mhd|dcm|ima|json|txt|csv|png|jpe?g|npy|npz|h5|zip|pt|pth)$",
                          re.IGNORECASE)
_SOFTWARE_KEYS = ("medsynth", "python", "numpy", "scipy", "SimpleITK", "torch", "monai", "nilearn")
_ENUMS: Mapping[str, frozenset[str]] = {
    "axis": frozenset({"LR", "AP", "SI"}),
    "about": frozenset({"tumour", "brain"}),
    "flip_about": frozenset({"tumour", "brain"}),
    "precision": frozenset({"fp32", "bf16", "fp16"}),
}


class _Redactions:
    def __init__(self) -> None:
        self.count = 0

    def drop(self) -> None:
        self.count += 1


def _safe_string(value: str) -> bool:
    return bool(_SAFE_TOKEN.match(value)) and not _FILE_SUFFIX.search(value)


def _clean_value(value: Any, redacted: _Redactions, depth: int = 0) -> tuple[bool, Any]:
    """(keep, cleaned) for one JSON value of an edit record."""
    if value is None or isinstance(value, bool):
        return True, value
    if isinstance(value, (int, float)):
        return (True, value) if np.isfinite(value) else (False, None)
    if isinstance(value, str):
        return (True, value) if _safe_string(value) else (False, None)
    if depth >= 4:
        return False, None
    if isinstance(value, list):
        items = []
        for item in value:
            keep, cleaned = _clean_value(item, redacted, depth + 1)
            if not keep:
                return False, None
            items.append(cleaned)
        return True, items
    if isinstance(value, dict):
        return True, _clean_mapping(value, redacted, depth + 1)
    return False, None


def _clean_mapping(data: Mapping[str, Any], redacted: _Redactions, depth: int = 0,
                   allowed: frozenset[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if (not isinstance(key, str) or not _SAFE_KEY.match(key) or _UNSAFE_KEY.search(key)
                or (allowed is not None and key not in allowed)):
            redacted.drop()
            continue
        keep, cleaned = _clean_value(value, redacted, depth)
        if keep and key in _ENUMS and isinstance(cleaned, str) and cleaned not in _ENUMS[key]:
            keep = False
        if keep:
            out[key] = cleaned
        else:
            redacted.drop()
    return out


def _known_edit_params() -> dict[str, frozenset[str]]:
    """Recorded parameter names of every edit (plus the anatomy step)."""
    import dataclasses

    from .edits import EDITS

    known = {"derive_labels": frozenset({"convention", "label_convention", "anatomy_model", "anatomy_contrasts"}),
             "template_labels": frozenset({"template", "anatomy_model"}),
             # Segment Editor strokes recorded by the Slicer module: counts only.
             "manual_segment_edit": frozenset({"changed_voxels", "voxel_change"})}
    for name, cls in EDITS.items():
        fields = {f.name for f in dataclasses.fields(cls)} - set(getattr(cls, "_unrecorded", ()))
        known[name] = frozenset(fields - {"source"})  # a source identifier may name a real case
    return known


def _clean_edits(edits: Any, redacted: _Redactions) -> list[dict[str, Any]]:
    if not isinstance(edits, list):
        if edits is not None:
            redacted.drop()
        return []
    known = _known_edit_params()
    out = []
    for record in edits:
        if not isinstance(record, dict) or record.get("name") not in known:
            redacted.drop()
            out.append({"name": "unrecognised", "params": {}, "schema_version": SCHEMA_VERSION})
            continue
        params = record.get("params", {})
        if not isinstance(params, dict):
            redacted.drop()
            params = {}
        version = record.get("schema_version", SCHEMA_VERSION)
        out.append({"name": record["name"], "params": _clean_mapping(params, redacted, allowed=known[record["name"]]),
                    "schema_version": version if isinstance(version, int) else SCHEMA_VERSION})
        redacted.count += sum(1 for key in record if key not in ("name", "params", "schema_version"))
    return out


REVIEW_NOTE_MAX_CHARS = 500


def _clean_review(review: Any, redacted: _Redactions) -> dict[str, Any] | None:
    """A clinician's rating of the synthetic case (1-5), its note and time; anything else dropped.

    The note is the reviewer's own text about the synthetic images and is exported as
    written (printable characters, at most 500); it is the reviewer's to keep free of identifiers.
    """
    if review is None:
        return None
    if not isinstance(review, dict):
        redacted.drop()
        return None
    rating = review.get("rating")
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        redacted.drop()
        return None
    out: dict[str, Any] = {"rating": rating}
    note = review.get("note")
    if isinstance(note, str):
        out["note"] = "".join(ch for ch in note if ch.isprintable() or ch in "\n\t")[:REVIEW_NOTE_MAX_CHARS]
    when = review.get("reviewed_at")
    if isinstance(when, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}T[0-9:.+\-Z]+", when):
        out["reviewed_at"] = when
    redacted.count += sum(1 for key in review if key not in ("rating", "note", "reviewed_at"))
    return out


def sanitise_provenance(raw: Mapping[str, Any], grid: Grid) -> tuple[dict[str, Any], int]:
    """Rebuild a synthetic case's provenance from a whitelist.

    Kept: model name and sha256, ``labels_sha256``, the edit records (only the
    parameters each edit records, and only numbers, booleans and plain tokens -
    never a path, a file name or a source identifier), seed, device, precision,
    software versions, timings and a clinician's review (rating, note, time).  Everything
    else is dropped, not copied.

    Returns:
        The clean provenance and the number of fields removed.
    """
    redacted = _Redactions()
    out: dict[str, Any] = {"kind": "medsynth-synthetic-case", "synthetic": True,
                           "label_schema_version": SCHEMA_VERSION}
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    name = model.get("name")
    sha = model.get("sha256")
    out["model"] = {"name": name if isinstance(name, str) and _safe_string(name) else "unnamed",
                    "sha256": sha if isinstance(sha, str) and _HEX64.match(sha) else None}
    if out["model"]["name"] == "unnamed" and name is not None:
        redacted.drop()
    labels_sha = raw.get("labels_sha256")
    out["labels_sha256"] = labels_sha if isinstance(labels_sha, str) and _HEX64.match(labels_sha) else None
    out["edits"] = _clean_edits(raw.get("edits"), redacted)
    seed = raw.get("seed")
    out["seed"] = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    for key in ("device", "precision"):
        value = raw.get(key)
        ok = isinstance(value, str) and _safe_string(value) and (key not in _ENUMS or value in _ENUMS[key])
        out[key] = value if ok else None
        if value is not None and not ok:
            redacted.drop()
    out["grid"] = grid.to_json()
    software = raw.get("software") if isinstance(raw.get("software"), dict) else {}
    out["software"] = {k: software[k] for k in _SOFTWARE_KEYS
                       if isinstance(software.get(k), str) and _safe_string(software[k])}
    timings = raw.get("timings_s") if isinstance(raw.get("timings_s"), dict) else {}
    out["timings_s"] = {k: v for k, v in timings.items() if isinstance(k, str) and _SAFE_KEY.match(k)
                        and not _UNSAFE_KEY.search(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
                        and np.isfinite(v)}
    review = _clean_review(raw.get("review"), redacted)
    if review is not None:
        out["review"] = review
    known_top = {"kind", "synthetic", "label_schema_version", "model", "labels_sha256", "edits", "seed",
                 "device", "precision", "grid", "software", "timings_s", "review"}
    redacted.count += sum(1 for key in raw if key not in known_top)
    return out, redacted.count


def provenance_summary(provenance: Mapping[str, Any], *, limit: int = 10240, with_params: bool = True) -> str:
    """One paragraph for DICOM text fields (Image Comments, Contribution Description)."""
    model = provenance.get("model", {})
    sha = model.get("sha256") or "unknown"
    edits = []
    for record in provenance.get("edits", []):
        params = record.get("params", {})
        if with_params and params:
            edits.append(f"{record['name']} {json.dumps(params, separators=(',', ':'), sort_keys=True)}")
        else:
            edits.append(record["name"])
    text = (f"SYNTHETIC IMAGE, not a real patient: generated by MedSynth {__version__} from a label map. "
            f"Model {model.get('name')} sha256 {sha}; seed {provenance.get('seed')}; "
            f"labels sha256 {provenance.get('labels_sha256')}; edits: {'; '.join(edits) or 'none'}.")
    if len(text) > limit:
        text = text[: limit - 4] + " ..."
    return text


# --- reading and validating a case -------------------------------------------------------------


@dataclass
class SyntheticCase:
    """One MedSynth output folder, validated, with its sanitised provenance."""

    images: dict[str, np.ndarray]  # modality -> (k, j, i) float32
    labels: LabelMap
    provenance: dict[str, Any]
    redacted: int = 0
    case_id: str = ""

    @property
    def grid(self) -> Grid:
        return self.labels.grid


def read_synthetic_case(folder: str | os.PathLike[str]) -> SyntheticCase:
    """Read and check a ``medsynth synthesize`` output folder.

    Raises:
        InputError: not a folder, a missing file, an unreadable or non-MedSynth
            provenance, volumes on different grids, or labels that do not match
            the provenance.
    """
    import SimpleITK as sitk

    from .io import read_image
    from .labelmaps import read_label_map
    from .provenance import array_sha256

    folder = Path(folder)
    if not folder.exists():
        raise InputError(folder, "output folder not found")
    if not folder.is_dir():
        raise InputError(folder, "not a folder (give a `medsynth synthesize` output folder)")
    for name in MODALITIES:
        if not (folder / f"{name}.nii.gz").is_file():
            raise InputError(folder, f"missing modality {name} ({name}.nii.gz) - not a complete synthetic case")
    for name in ("labels.nii.gz", "provenance.json"):
        if not (folder / name).is_file():
            raise InputError(folder, f"missing {name} - not a complete synthetic case")
    try:
        raw = json.loads((folder / "provenance.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(folder / "provenance.json", f"unreadable provenance ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("kind") != "medsynth-synthetic-case" or raw.get("synthetic") is not True:
        raise InputError(folder / "provenance.json",
                         "not the provenance of a MedSynth synthetic case; only synthetic cases can be exported")
    if raw.get("label_schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise InputError(folder / "provenance.json", f"label schema version {raw.get('label_schema_version')!r} "
                                                     f"is not this MedSynth's schema version {SCHEMA_VERSION}")
    labels = read_label_map(folder / "labels.nii.gz")
    if raw.get("labels_sha256") != array_sha256(labels.array):
        raise InputError(folder / "labels.nii.gz",
                         "does not match provenance.json (labels_sha256 differs): the case was changed after synthesis")
    images = {}
    for name in MODALITIES:
        path = folder / f"{name}.nii.gz"
        image = read_image(path)
        difference = labels.grid.difference(Grid.from_image(image))
        if difference is not None:
            raise InputError(path, f"not on the grid of labels.nii.gz: {difference}")
        images[name] = sitk.GetArrayFromImage(image).astype(np.float32)
    provenance, redacted = sanitise_provenance(raw, labels.grid)
    case = SyntheticCase(images, labels, provenance, redacted)
    case.case_id = default_case_id(case)
    return case


def default_case_id(case: SyntheticCase) -> str:
    """``SYNTH-`` + 10 hex digits of a sha256 over the synthetic content (deterministic)."""
    from .provenance import array_sha256

    digest = hashlib.sha256(b"medsynth-export-case-id/1")
    digest.update(array_sha256(case.labels.array).encode())
    for name in MODALITIES:
        digest.update(array_sha256(case.images[name]).encode())
    return "SYNTH-" + digest.hexdigest()[:10]


def check_case_id(case_id: str) -> str:
    if not CASE_ID_PATTERN.match(case_id):
        raise InputError(None, f"case id {case_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
                               "(starting with a letter or digit)")
    return case_id


# --- intensities -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntensityEncoding:
    """How one volume is stored: ``value = stored * slope`` (intercept 0 keeps background exactly 0)."""

    nifti: np.ndarray  # int16 or float32: what the NIfTI export holds
    stored: np.ndarray  # int16: DICOM stored values
    slope: float


def encode_intensities(array: np.ndarray) -> IntensityEncoding:
    """int16 (rounded, slope 1) where that loses nothing that matters, else float32 + int16 rescale."""
    from pydicom.valuerep import format_number_as_ds

    from .io import compact_intensities

    values = np.asarray(array, dtype=np.float64)
    compact = compact_intensities(values)
    if compact.dtype == np.int16:
        return IntensityEncoding(compact, compact, 1.0)
    peak = float(np.max(np.abs(values)))
    # One count of headroom: the 16-character DS text of the slope may round it down a little.
    slope = float(format_number_as_ds(peak / 32766.0))
    stored = np.clip(np.round(values / slope), -32768, 32767).astype(np.int16)
    return IntensityEncoding(values.astype(np.float32), stored, slope)


# --- NIfTI -------------------------------------------------------------------------------------


def anatomy_array(labels: np.ndarray) -> np.ndarray:
    """CSF 1, GM 2, WM 3; background and tumour 0."""
    return np.where(labels <= Label.WM, labels, 0).astype(np.uint8)


def write_nifti_case(case: SyntheticCase, folder: Path, case_id: str, naming: str = "brats2021") -> list[str]:
    """Write the BraTS-named NIfTI files of one case into ``folder``; returns the file names."""
    from .io import write_image

    suffixes = NAMINGS[naming]
    grid = case.grid
    names = []
    for modality in MODALITIES:
        name = f"{case_id}{suffixes[modality]}.nii.gz"
        write_image(grid.image(encode_intensities(case.images[modality]).nifti), folder / name)
        names.append(name)
    name = f"{case_id}{suffixes['seg']}.nii.gz"
    write_image(grid.image(schema_to_tumour(case.labels.array, naming)), folder / name)
    names.append(name)
    name = f"{case_id}{suffixes['anatomy']}.nii.gz"
    write_image(grid.image(anatomy_array(case.labels.array)), folder / name)
    names.append(name)
    return names


# --- DICOM -------------------------------------------------------------------------------------


def _ds(value: float) -> Any:
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def _rgb_to_cielab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """sRGB in [0, 1] -> CIE L*a*b* (D65)."""
    linear = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in rgb]
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = m @ np.array(linear) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return float(116 * f[1] - 16), float(500 * (f[0] - f[1])), float(200 * (f[1] - f[2]))


@dataclass
class _DicomContext:
    case_id: str
    exported_at: datetime
    study_uid: str
    frame_of_reference_uid: str
    provenance: dict[str, Any]

    @property
    def date(self) -> str:
        return self.exported_at.strftime("%Y%m%d")

    @property
    def time(self) -> str:
        return self.exported_at.strftime("%H%M%S")


def _contributing_equipment(ctx: _DicomContext) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model = ctx.provenance["model"]
    return hd.ContributingEquipment(
        manufacturer="MedSynth",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"MedSynth model {model['name']}"[:64],
        software_versions=_software_versions(ctx),
        contribution_datetime=ctx.exported_at.replace(tzinfo=None),
        contribution_description=provenance_summary(ctx.provenance, limit=1024, with_params=False),
    )


def _software_versions(ctx: _DicomContext) -> list[str]:
    sha = ctx.provenance["model"].get("sha256") or "unknown"
    return [f"MedSynth {__version__}", f"model sha256 {sha[:48]}"]


def _common_dataset(ctx: _DicomContext) -> Any:
    """Patient, study, frame of reference, equipment and synthetic/de-identification attributes."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ds = Dataset()
    ds.PatientName = f"SYNTHETIC^{ctx.case_id}"  # family name says it, given name is the case id
    ds.PatientID = ctx.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    ds.SyntheticData = "YES"
    ds.StudyInstanceUID = ctx.study_uid
    ds.StudyDate = ctx.date
    ds.StudyTime = ctx.time
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MedSynth synthetic brain tumour MRI"
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "MedSynth"
    ds.ManufacturerModelName = "MedSynth synthetic MRI"
    ds.SoftwareVersions = _software_versions(ctx)
    ds.BodyPartExamined = "BRAIN"
    ds.TimezoneOffsetFromUTC = "+0000"
    ds.InstanceCreationDate = ctx.date
    ds.InstanceCreationTime = ctx.time
    ds.ContributingEquipmentSequence = DicomSequence([_contributing_equipment(ctx)])
    return ds


def _mr_series(modality: str, values: np.ndarray, grid: Grid, ctx: _DicomContext) -> list[Any]:
    """One MR Image Storage dataset per slice (third grid axis) of one modality."""
    import highdicom as hd
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    encoding = encode_intensities(values)
    folder_name, description, number = DICOM_SERIES[modality]
    series_uid = hd.UID()
    direction = grid.direction_matrix
    row_dir, col_dir = direction[:, 0], direction[:, 1]  # along i (a row), along j (a column)
    normal = np.cross(row_dir, col_dir)
    brain = values[values != 0]
    low, high = np.percentile(brain, [0.5, 99.5]) if brain.size else (0.0, 1.0)
    common = _common_dataset(ctx)
    common.SOPClassUID = MR_IMAGE_STORAGE
    common.Modality = "MR"
    common.SeriesInstanceUID = series_uid
    common.SeriesNumber = number
    common.SeriesDate = ctx.date
    common.SeriesTime = ctx.time
    common.SeriesDescription = f"{description} synthetic (MedSynth)"
    common.PatientPosition = ""
    common.ImageType = ["DERIVED", "SECONDARY"]
    common.ContentDate = ctx.date
    common.ContentTime = ctx.time
    common.ImageComments = provenance_summary(ctx.provenance)
    common.BurnedInAnnotation = "NO"
    common.ScanningSequence = "RM"  # research mode: no pulse sequence made these images
    common.SequenceVariant = "NONE"
    common.ScanOptions = ""
    common.MRAcquisitionType = "3D"
    common.RepetitionTime = ""
    common.EchoTime = ""
    common.EchoTrainLength = ""
    common.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    common.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[0])]  # [between rows, between columns]
    common.SliceThickness = _ds(grid.spacing[2])
    common.SpacingBetweenSlices = _ds(grid.spacing[2])
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows = grid.size[1]
    common.Columns = grid.size[0]
    common.BitsAllocated = 16
    common.BitsStored = 16
    common.HighBit = 15
    common.PixelRepresentation = 1
    common.RescaleIntercept = _ds(0)
    common.RescaleSlope = _ds(encoding.slope)
    common.RescaleType = "US"
    common.WindowCenter = _ds((low + high) / 2)
    common.WindowWidth = _ds(max(high - low, 1e-3))
    datasets = []
    for k in range(grid.size[2]):
        ds = copy.deepcopy(common)
        position = grid.index_to_lps(np.array([0.0, 0.0, float(k)]))
        ds.SOPInstanceUID = hd.UID()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.PixelData = np.ascontiguousarray(encoding.stored[k], dtype="<i2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        datasets.append(ds)
    return datasets


def _segmentation(case: SyntheticCase, t1: list[Any], ctx: _DicomContext) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="MedSynth", family=codes.DCM.ArtificialIntelligence,
                                                   version=__version__)
    from .labels import LABEL_INFO

    descriptions = []
    for number, label, short, text in SEG_SEGMENTS:
        kind = {Label.NCR: codes.SCT.Necrosis, Label.ED: codes.SCT.Edema, Label.ET: codes.SCT.Neoplasm}[label]
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=short,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=kind, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"{ctx.case_id} {short}",
            anatomic_regions=[codes.SCT.Brain],
            display_color=hd.color.CIELabColor(*_rgb_to_cielab(LABEL_INFO[label].color)))
        description.SegmentDescription = text
        descriptions.append(description)
    lut = np.zeros(len(Label), np.uint8)
    for number, label, _, _ in SEG_SEGMENTS:
        lut[label] = number
    pixels = lut[case.labels.array]
    seg = hd.seg.Segmentation(
        source_images=t1, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MedSynth",
        manufacturer_model_name="MedSynth synthetic MRI", software_versions=_software_versions(ctx),
        device_serial_number="0", content_description="Synthetic tumour labels (NCR, ED, ET)",
        content_creator_name="MedSynth^", content_label="TUMOUR",
        omit_empty_frames=bool(pixels.any()),
        contributing_equipment=[_contributing_equipment(ctx)],
    )
    seg.SeriesDescription = "Tumour segmentation synthetic (MedSynth)"
    seg.PatientIdentityRemoved = "YES"
    seg.DeidentificationMethod = DEIDENTIFICATION_METHOD
    seg.SyntheticData = "YES"
    seg.TimezoneOffsetFromUTC = "+0000"
    seg.SeriesDate = ctx.date
    seg.SeriesTime = ctx.time
    seg.ContentDate = ctx.date
    seg.ContentTime = ctx.time
    seg.InstanceCreationDate = ctx.date
    seg.InstanceCreationTime = ctx.time
    seg.BodyPartExamined = "BRAIN"
    return seg


def write_dicom_case(case: SyntheticCase, folder: Path, case_id: str, exported_at: datetime,
                     provenance: dict[str, Any]) -> list[str]:
    """Write the MR series and the Segmentation of one case into ``folder``; returns relative paths."""
    import highdicom as hd

    ctx = _DicomContext(case_id, exported_at, hd.UID(), hd.UID(), provenance)
    written = []
    t1: list[Any] = []
    for modality in MODALITIES:
        datasets = _mr_series(modality, case.images[modality], case.grid, ctx)
        series_dir = folder / DICOM_SERIES[modality][0]
        series_dir.mkdir()
        width = max(4, len(str(len(datasets))))
        for index, ds in enumerate(datasets, start=1):
            name = f"IM{index:0{width}d}.dcm"
            ds.save_as(series_dir / name, enforce_file_format=True)
            written.append(f"{series_dir.name}/{name}")
        if modality == "t1":
            t1 = datasets
    seg = _segmentation(case, t1, ctx)
    (folder / "SEG").mkdir()
    seg.save_as(folder / "SEG" / "seg.dcm", enforce_file_format=True)
    written.append("SEG/seg.dcm")
    return written


# --- the export --------------------------------------------------------------------------------


def _readme(case_id: str, fmt: str, naming: str, files: list[str], provenance: dict[str, Any]) -> str:
    model = provenance["model"]
    lines = [
        f"MedSynth export - case {case_id}",
        "",
        "SYNTHETIC DATA. These images are not a scan of any person. They were generated by",
        f"MedSynth {__version__} (model {model['name']}, sha256 {model['sha256']}) from a label map.",
        "They carry no source patient data: no name, identifier, date or file path of a source scan.",
        "The case id and the DICOM patient name/ID are generated.",
        "",
    ]
    if fmt == "nifti":
        labels = "1 NCR, 2 ED, 4 ET" if naming == "brats2021" else "1 NCR, 2 ED, 3 ET"
        lines += [
            f"Format: NIfTI, {naming.replace('brats', 'BraTS ')} naming.",
            f"  *{NAMINGS[naming]['seg']}.nii.gz      tumour labels ({labels})",
            f"  *{NAMINGS[naming]['anatomy']}.nii.gz  anatomy labels (1 CSF, 2 GM, 3 WM; 0 background and tumour)",
            "Open in 3D Slicer with File > Add Data.",
        ]
    else:
        lines += [
            "Format: DICOM. One study; one MR series per modality (T1, T1ce, T2, FLAIR) and a",
            "DICOM Segmentation (SEG/, segments NCR, ED, ET) referencing the T1 series.",
            "Every file has Synthetic Data (0008,001C) = YES.",
            "Open in 3D Slicer with the DICOM module (Import this folder), or in any DICOM viewer.",
        ]
    listing: dict[str, int] = {}
    for name in files:  # a DICOM series folder is listed once, with its file count
        key = name.split("/")[0] + "/" if "/" in name else name
        listing[key] = listing.get(key, 0) + 1
    lines += ["", "provenance.json: how the case was made (model, label-map hash, edits, seed, software).",
              "", "Files:"]
    for key, count in listing.items():
        lines.append(f"  {key} ({count} file{'s' if count != 1 else ''})" if key.endswith("/") else f"  {key}")
    return "\n".join(lines) + "\n"


def export_case(case: SyntheticCase, folder: Path, fmt: str, case_id: str, naming: str = "brats2021",
                exported_at: datetime | None = None) -> Path:
    """Write one case's export into the (empty, existing) ``folder``."""
    from . import io as medsynth_io
    from importlib import metadata

    exported_at = exported_at or datetime.now(timezone.utc)
    provenance = dict(case.provenance)
    software = {}
    for package in ("SimpleITK", "pydicom", "highdicom"):
        try:
            software[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    provenance["export"] = {
        "format": fmt, "naming": naming if fmt == "nifti" else None, "case_id": case_id,
        "exported_at": exported_at.isoformat(timespec="seconds"), "medsynth_version": __version__,
        "software": software, "removed_fields": case.redacted,
    }
    if fmt == "nifti":
        files = write_nifti_case(case, folder, case_id, naming)
    elif fmt == "dicom":
        files = write_dicom_case(case, folder, case_id, exported_at, provenance)
    else:
        raise MedSynthError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    medsynth_io.write_json(provenance, folder / "provenance.json")
    (folder / "README.txt").write_text(_readme(case_id, fmt, naming, files + ["provenance.json"], provenance))
    return folder


def export_cases(folders: Sequence[str | os.PathLike[str]], export_root: str | os.PathLike[str], fmt: str, *,
                 naming: str = "brats2021", case_id: str | None = None, overwrite: bool = False,
                 progress: Callable[[str], None] | None = None) -> list[Path]:
    """Export synthetic case folders into ``export_root/<case-id>/``.

    Every input is read and checked, and every target checked, before anything
    is written; the cases are then built in one hidden temporary folder inside
    ``export_root`` and moved into place only when all are complete.  Progress:
    ``progress`` is called twice per case (checked, written).

    Raises:
        InputError: a bad input case, a bad case id, an unwritable target.
        OutputExistsError: a target case folder exists and ``overwrite`` is false.
    """
    from .io import check_writable

    step = progress or (lambda label: None)
    if fmt not in FORMATS:
        raise MedSynthError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if naming not in NAMINGS:
        raise MedSynthError(f"unknown naming {naming!r} (choose from {', '.join(NAMINGS)})")
    folders = [Path(f) for f in folders]
    if not folders:
        raise MedSynthError("no case folders to export")
    if case_id is not None:
        if len(folders) > 1:
            raise MedSynthError("--case-id names one case; give one output folder (ids are generated per case)")
        check_case_id(case_id)
    root = Path(export_root)
    if root.exists() and not root.is_dir():
        raise InputError(root, "export target exists and is not a folder")

    # 1. Check every input (a single case is kept in memory, a batch is read again when written).
    ids: list[str] = []
    kept: SyntheticCase | None = None
    seen: dict[str, Path] = {}
    for folder in folders:
        case = read_synthetic_case(folder)
        cid = case_id or case.case_id
        if cid in seen:
            raise InputError(folder, f"the same synthetic case as {seen[cid]} (case id {cid}); give it once")
        seen[cid] = folder
        ids.append(cid)
        if len(folders) == 1:
            kept = case
        step(f"checked {cid}")
    targets = [root / cid for cid in ids]
    for target in targets:
        if target.exists() and not target.is_dir():
            raise InputError(target, "exists and is not a folder")
    check_writable(targets, overwrite)

    # 2. Build everything in a hidden staging folder, then move each case into place.
    created = [parent for parent in [root, *root.parents] if not parent.exists()]  # innermost first
    staging: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".medsynth-export.", suffix=".tmp", dir=root))
        exported_at = datetime.now(timezone.utc).replace(microsecond=0)
        for folder, cid in zip(folders, ids):
            case = kept if kept is not None else read_synthetic_case(folder)
            (staging / cid).mkdir()
            export_case(case, staging / cid, fmt, cid, naming, exported_at)
            os.chmod(staging / cid, 0o777 & ~_umask())
            step(f"written {cid}")
        for cid, target in zip(ids, targets):
            if target.exists():
                if not overwrite:
                    raise OutputExistsError(target)
                os.replace(target, staging / f".old-{cid}")
            os.replace(staging / cid, target)
    except OSError as exc:
        raise InputError(root, f"cannot write the export ({exc.strerror or exc})") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # folders this call made, when it left them empty (a failure)
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    return targets


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = [
    "FORMATS", "NAMINGS", "MODALITIES", "SyntheticCase", "read_synthetic_case", "sanitise_provenance",
    "default_case_id", "encode_intensities", "export_case", "export_cases", "provenance_summary",
]
