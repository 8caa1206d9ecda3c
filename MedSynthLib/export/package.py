"""``medsynth export``: share synthetic cases as BraTS NIfTI or DICOM, marked synthetic.

An export is built for the tools people use - BraTS pipelines, PACS and DICOM viewers,
3D Slicer - says plainly that it is synthetic, and states how much of a real patient it
still carries:

* only a verified synthetic case folder is exported (:mod:`MedSynthLib.synthesis.case_folder`):
  every image must have the sha256 recorded when it was synthesised, so a real scan copied
  or linked into the folder is refused;
* every image is written fresh from its voxel array and grid; no input file is copied;
* ``provenance.json`` is rebuilt from the case's typed record (:mod:`.sanitise`);
* the case's measured privacy (anatomy from a patient or the template, brain-mask and tumour
  Dice against the source patient) is written to ``provenance.json``, the DICOM comments and
  ``README.txt``; with ``anonymous=True`` a case that is not anonymous is refused;
* a case whose records say it is anonymous is checked against its voxels (:mod:`.template_check`: the template's
  grid, labels and brain), since whoever wrote the folder wrote its records and hashes too; one that fails is not
  anonymous;
* the case id is generated (:func:`default_case_id`), never derived from a file or folder name; one given
  for a case that is not anonymous may not begin ``SYNTH`` (:func:`check_case_id_for`), one given for an
  anonymous case may not name a case of the source data (:func:`check_case_id_not_a_source`).

The case id defaults to ``SYNTH-`` for an anonymous case (``NOT-ANONYMOUS-`` for a synthetic case that is not,
``PATIENT-`` for a patient's scan with a region inpainted) and 10 hex digits of a sha256 over the case's content
(the label map and the four images): deterministic, so exporting the same case again
lands in the same folder (and needs ``--overwrite``), and computable only from the synthetic
data itself.  Layouts: :mod:`.nifti`, :mod:`.dicom`; intensities: :mod:`.encoding`.
"""

from __future__ import annotations

import dataclasses

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from ..schema.errors import InputError, MedSynthError, OutputExistsError
from ..schema.grid import Grid, LabelMap
from ..schema.labels import MODALITIES
from ..schema.provenance import ExportRecord, PrivacyRecord, privacy_of
from .dicom import ANONYMOUS_FAMILY_NAME, patient_name_family, write_dicom_case
from .nifti import NAMINGS, write_nifti_case
from .sanitise import sanitise_provenance

FORMATS = ("nifti", "dicom")
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class SyntheticCase:
    """One verified synthetic case folder with its sanitised provenance."""

    images: dict[str, np.ndarray]  # modality -> (k, j, i), as stored (int16 or float32)
    labels: LabelMap
    provenance: dict[str, Any]
    redacted: int = 0
    case_id: str = ""
    privacy: PrivacyRecord = PrivacyRecord()
    synthetic_mask: np.ndarray | None = None  # the re-rendered voxels of a patient's scan (inpainting), else None
    #: Whether :attr:`labels` holds the healthy anatomy (a generate case folder keeps the tumour labels only).
    anatomy: bool = True
    #: Where a case whose record says template anatomy is not the template's: (the file, why)
    #: (:func:`~MedSynthLib.export.template_check.template_anatomy_problem`); its privacy is then ``unknown``.
    anatomy_problem: tuple[Path, str] | None = None
    #: Every name the case's records hold (local-only and unknown fields too, read before they are stripped), in
    #: lower case: an anonymous export's case id may not be one (:func:`check_case_id_not_a_source`).
    recorded_names: frozenset[str] = frozenset()

    @property
    def grid(self) -> Grid:
        return self.labels.grid


#: Name of the hidden staging folders an export builds its cases in, inside the export folder.
EXPORT_STAGE = "export"


#: What a ``medsynth generate`` case record keeps for the dataset (its card, resuming, timings): not part of the
#: case's synthesis record, and left out of an export without being counted as a removed field.
GENERATE_BOOKKEEPING = ("case_id", "layout", "files", "files_sha256", "generation", "tumour", "edit_grid",
                        "images_sha256", "stages", "cpu_s", "worker")


def _generated_case_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A generate case record without the dataset's bookkeeping: the privacy record's fields alone (the verdict
    and its reason are judged again), the timings :class:`SynthesisRecord` keeps."""
    from ..schema.provenance import TIMING_KEYS

    out = {k: v for k, v in raw.items() if k not in GENERATE_BOOKKEEPING}
    names = {f.name for f in dataclasses.fields(PrivacyRecord)}
    if isinstance(out.get("privacy"), dict):
        out["privacy"] = {k: v for k, v in out["privacy"].items() if k in names}
    if isinstance(out.get("timings_s"), dict):
        out["timings_s"] = {k: v for k, v in out["timings_s"].items() if k in TIMING_KEYS}
    return out


def _generated_privacy(privacy: PrivacyRecord, generation: Any) -> PrivacyRecord:
    """The recorded privacy of a generate case, unless its generation record contradicts an anonymous verdict.

    The label map's history in a generate record starts at the sampler's draw, not where the map began, so it
    cannot judge the anatomy; the generation record can: only a parametric tumour drawn in the template is
    anonymous (``--anonymous``).  A record calling another case anonymous was not written by generate.
    """
    generation = generation if isinstance(generation, dict) else {}
    base = generation.get("base")
    drawn_in_template = base == "template" and generation.get("kind") == "parametric" and \
        not generation.get("tumour_source")
    if not privacy.anonymous()[0] or drawn_in_template:
        return privacy
    anatomy = "template" if base == "template" else ("patient" if isinstance(base, str) else "unknown")
    return PrivacyRecord(anatomy, 1.0 if anatomy == "patient" else None, None, "unknown", privacy.images)


def _checked_against_the_template(privacy: PrivacyRecord, folder_case: Any
                                  ) -> tuple[PrivacyRecord, tuple[Path, str] | None]:
    """An anonymous privacy record checked against the voxels (:mod:`.template_check`); one they do not bear out
    becomes ``unknown`` anatomy (not anonymous), with the file and the reason."""
    from .template_check import template_anatomy_problem

    if not privacy.anonymous()[0]:
        return privacy, None
    problem = template_anatomy_problem(folder_case)
    if problem is None:
        return privacy, None
    return PrivacyRecord("unknown", None, None, privacy.tumour_origin, privacy.images), problem


def read_synthetic_case(folder: str | os.PathLike[str]) -> SyntheticCase:
    """Read, verify and sanitise a ``medsynth synthesize`` output folder, or a case folder of a ``medsynth
    generate`` dataset in a BraTS layout (its record in the dataset's ``provenance/``).

    Raises:
        InputError: see :func:`MedSynthLib.synthesis.case_folder.read_case_folder`.
    """
    from ..synthesis.case_folder import read_case_folder

    folder_case = read_case_folder(folder)
    if folder_case.generated:
        raw = _generated_case_record(folder_case.raw_provenance)
        recorded = PrivacyRecord.from_json(raw.get("privacy")) or PrivacyRecord()
        privacy = _generated_privacy(recorded, folder_case.raw_provenance.get("generation"))
        privacy, problem = _checked_against_the_template(privacy, folder_case)
        provenance, redacted = sanitise_provenance(raw, folder_case.grid, privacy)
        case = SyntheticCase(folder_case.images, folder_case.labels, provenance, redacted, privacy=privacy,
                             anatomy=False, anatomy_problem=problem,
                             recorded_names=recorded_names([folder_case.raw_provenance, folder_case.labels.history]))
        case.case_id = default_case_id(case)
        return case
    privacy = folder_case.record.privacy or privacy_of(folder_case.labels)
    judged = PrivacyRecord.from_history(folder_case.labels.history, folder_case.labels.array)
    if privacy.anonymous()[0] and not judged.anonymous()[0]:
        # A record an earlier MedSynth measured can be laxer than the history it sits beside (a parametric tumour
        # drawn over a real one was counted as parametric): the history's origin, which needs no measuring, holds.
        privacy = dataclasses.replace(judged, images=privacy.images)
    if folder_case.record.inpainting is not None and privacy.images != "patient":
        # A real scan with a region inpainted carries the patient's images whatever its privacy record says.
        privacy = dataclasses.replace(privacy, images="patient")
    privacy, problem = _checked_against_the_template(privacy, folder_case)
    provenance, redacted = sanitise_provenance(folder_case.raw_provenance, folder_case.grid, privacy)
    case = SyntheticCase(folder_case.images, folder_case.labels, provenance, redacted, privacy=privacy,
                         synthetic_mask=folder_case.synthetic_mask, anatomy_problem=problem,
                         recorded_names=recorded_names([folder_case.raw_provenance, folder_case.labels.history]))
    case.case_id = default_case_id(case)
    return case


def default_case_id(case: SyntheticCase) -> str:
    """A prefix + 10 hex digits of a sha256 over the synthetic content (deterministic).

    The id is the DICOM PatientID, which a PACS worklist shows beside the patient name: ``SYNTH-`` (synthetic, free
    to share) only for an anonymous case; ``NOT-ANONYMOUS-`` for synthetic images of a patient's anatomy or tumour
    (or of a label map whose source is unknown), as its patient name ``NOT-ANONYMOUS^``; ``PATIENT-`` for a
    patient's scan with a region inpainted."""
    from ..schema.provenance import array_sha256

    digest = hashlib.sha256(b"medsynth-export-case-id/1")
    digest.update(array_sha256(case.labels.array).encode())
    for name in MODALITIES:
        # Hash the values, not the stored type, so the id does not depend on int16 vs float32 storage.
        digest.update(array_sha256(np.asarray(case.images[name], np.float32)).encode())
    if case.privacy.images == "patient":
        prefix = "PATIENT-"
    else:
        prefix = "SYNTH-" if case.privacy.anonymous()[0] else "NOT-ANONYMOUS-"
    return prefix + digest.hexdigest()[:10]


def check_case_id(case_id: str) -> str:
    if not CASE_ID_PATTERN.match(case_id):
        raise InputError(None, f"case id {case_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
                               "(starting with a letter or digit)")
    return case_id


#: The prefix of an anonymous synthetic case (:func:`default_case_id`): no id given to a case that is not
#: anonymous may begin with it, in any case (``SYNTH-``, ``synth_``, ``SYNTHETIC``).
SYNTHETIC_ID_PREFIX = "SYNTH"


def check_case_id_for(case: SyntheticCase, case_id: str, folder: Path) -> None:
    """Refuse an id that calls a case that is not anonymous synthetic: a patient's scan (a region inpainted:
    ``synthesize --context``), or synthetic images of a patient's anatomy or tumour."""
    if not case_id.upper().startswith(SYNTHETIC_ID_PREFIX):
        return
    if case.privacy.images == "patient":
        raise InputError(folder, f"case id {case_id!r}: ids beginning {SYNTHETIC_ID_PREFIX} are for cases whose "
                                 "images are synthetic, and this case is a real patient's scan with one region "
                                 f"re-rendered (its default id is {case.case_id}); choose another --case-id")
    anonymous, reason = case.privacy.anonymous()
    if case.anatomy_problem is not None:
        reason = f"its anatomy is not the template's its record claims: {case.anatomy_problem[1]}"
    if not anonymous:
        raise InputError(folder, f"case id {case_id!r}: ids beginning {SYNTHETIC_ID_PREFIX} are for anonymous "
                                 f"synthetic cases, and this case is not anonymous ({reason}; its default id is "
                                 f"{case.case_id}); choose another --case-id")


#: Patient ids of the public brain tumour datasets MedSynth's sources come from (BraTS and the TCIA collections
#: behind it): BraTS2021_00000, Brats18_CBICA_ABM_1, BraTS-GLI-00000-000, TCGA-02-0006, UPENN-GBM-00001,
#: UCSF-PDGM-0004, CBICA_ABM_1 ...; matched case-insensitively at the start of an id.
PUBLIC_DATASET_ID = re.compile(r"^(brats|(tcga|upenn|ucsf|ucsd|cbica|ivygap|rhuh|cptac|rembrandt|lumiere|egd|acrin|"
                               r"qin)[-_])", re.IGNORECASE)
#: What is cut off a recorded file name to leave its case: the image suffix, then a modality or segmentation suffix.
_FILE_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd|\.json|\.npy|\.dcm)$", re.IGNORECASE)
_MODALITY_SUFFIX = re.compile(r"[-_](t1|t1ce|t1gd|t1c|t1n|t2|t2w|t2f|flair|seg|labels?)$", re.IGNORECASE)


def recorded_names(records: Sequence[Any]) -> frozenset[str]:
    """Every string the records hold (at any depth, but a generate record's own bookkeeping: its case id and file
    names are the dataset's, not a source's), split at path separators and white space, with each name's file and
    modality suffixes cut off as well; in lower case."""
    names: set[str] = set()

    def walk(value: Any, top: bool = False) -> None:
        if isinstance(value, str):
            for token in re.split(r"[/\\\s,;:|]+", value):
                stem = _FILE_SUFFIX.sub("", token)
                names.update(t.lower() for t in (token, stem, _MODALITY_SUFFIX.sub("", stem)) if t)
        elif isinstance(value, dict):
            for key, item in value.items():
                if not (top and key in GENERATE_BOOKKEEPING and key not in ("generation", "tumour")):
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for record in records:
        walk(record, top=True)
    return frozenset(names)


def check_case_id_not_a_source(case: SyntheticCase, case_id: str, folder: Path) -> None:
    """Refuse, for an anonymous case, an id that names a case of the source data: a public dataset's patient id, or
    a name its records hold (its PatientID and name would carry it, beside Patient Identity Removed YES)."""
    if not case.privacy.anonymous()[0]:
        return
    lowered = case_id.lower()
    if PUBLIC_DATASET_ID.match(case_id):
        why = "has the form of a public dataset's patient id (BraTS, TCGA, UPENN, UCSF ...)"
    elif lowered in case.recorded_names or any(name.startswith(lowered + sep) for name in case.recorded_names
                                                for sep in "_-."):
        why = "is a name the case's provenance records (a source case, file or note)"
    else:
        return
    raise InputError(folder, f"case id {case_id!r} {why}: an anonymous export's DICOM patient name and ID may not "
                             "name a case of the source data; choose another --case-id")


def _readme(case_id: str, fmt: str, naming: str, files: list[str], provenance: dict[str, Any],
            anatomy: bool = True) -> str:
    from .sanitise import exported_privacy, label_map_source

    model = provenance["model"]
    privacy = exported_privacy(provenance)
    if provenance.get("inpainting"):
        opening = ["PARTLY SYNTHETIC DATA OF A REAL PATIENT. Outside one region these images are the patient's",
                   f"own scan; MedSynth {__version__} (model {model['name']}, sha256 {model['sha256']}) re-rendered",
                   "only the region around an edited tumour. NOT anonymous."]
    elif privacy.anonymous()[0]:
        opening = ["SYNTHETIC DATA. These images are not a scan of any person. They were generated by",
                   f"MedSynth {__version__} (model {model['name']}, sha256 {model['sha256']}) from a label map."]
    else:  # synthetic images of a label map that carries a real patient (or may: its source unknown)
        opening = ["SYNTHETIC IMAGES, NOT anonymous. Every voxel was generated by MedSynth, from a label map whose",
                   f"{label_map_source(privacy)}, which can identify that patient.",
                   f"MedSynth {__version__}, model {model['name']}, sha256 {model['sha256']}."]
    lines = [
        f"MedSynth export - case {case_id}",
        "",
        *opening,
        "They carry no name, identifier, date or file path of a source scan; the case id and the",
        "DICOM patient name/ID are generated.",
        "",
        privacy.statement(),
        "A label map derived from a real case keeps that patient's brain outline (and tumour shape;",
        "a replaced or erased tumour's outline stays in the refilled anatomy), which can identify",
        "the patient: see MedSynth's README, 'What is and is not anonymous'.",
        "",
    ]
    if fmt == "nifti":
        labels = "1 NCR, 2 ED, 4 ET" if naming == "brats2021" else "1 NCR, 2 ED, 3 ET"
        lines += [
            f"Format: NIfTI, {naming.replace('brats', 'BraTS ')} naming.",
            f"  *{NAMINGS[naming]['seg']}.nii.gz      tumour labels ({labels})",
            (f"  *{NAMINGS[naming]['anatomy']}.nii.gz  anatomy labels (1 CSF, 2 GM, 3 WM; 0 background and tumour)"
             if anatomy else "  no anatomy labels: the generated dataset this case comes from keeps the tumour only"),
            *([f"  *{NAMINGS[naming]['synthetic_mask']}.nii.gz  1 = voxel re-rendered by MedSynth, 0 = the patient's scan"]
              if provenance.get("inpainting") else []),
            "Open in 3D Slicer with File > Add Data.",
        ]
    else:
        family = patient_name_family(provenance)
        if provenance.get("inpainting"):
            marks = [f"Patient name {family}^<case id>: the images are the patient's scan with one region re-rendered;",
                     "Synthetic Data (0008,001C) = YES on the slices that hold a re-rendered voxel, NO on the others."]
        elif family == ANONYMOUS_FAMILY_NAME:
            marks = [f"Patient name {family}^<case id>; every file has Synthetic Data (0008,001C) = YES."]
        else:
            marks = [f"Patient name {family}^<case id>: synthetic images that can identify a patient;",
                     "every file has Synthetic Data (0008,001C) = YES."]
        lines += [
            "Format: DICOM. One study; one MR series per modality (T1, T1ce, T2, FLAIR) and a",
            "DICOM Segmentation (SEG/, segments NCR, ED, ET) referencing the T1 series.",
            *marks,
            "Open in 3D Slicer with the DICOM module (Import this folder), or in any DICOM viewer.",
        ]
    listing: dict[str, int] = {}
    for name in files:  # a DICOM series folder is listed once, with its file count
        key = name.split("/")[0] + "/" if "/" in name else name
        listing[key] = listing.get(key, 0) + 1
    lines += ["", "provenance.json: how the case was made (model, label-map hash, edits, privacy, seed, software).",
              "", "Files:"]
    for key, count in listing.items():
        lines.append(f"  {key} ({count} file{'s' if count != 1 else ''})" if key.endswith("/") else f"  {key}")
    return "\n".join(lines) + "\n"


def export_case(case: SyntheticCase, folder: Path, fmt: str, case_id: str, naming: str = "brats2021",
                exported_at: datetime | None = None) -> Path:
    """Write one case's export into the (empty, existing) ``folder``."""
    from importlib import metadata

    from ..schema import volume_io as medsynth_io

    exported_at = exported_at or datetime.now(timezone.utc)
    provenance = dict(case.provenance)
    software = {}
    for package in ("SimpleITK", "pydicom", "highdicom"):
        try:
            software[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    provenance["export"] = ExportRecord(
        format=fmt, naming=naming if fmt == "nifti" else None, case_id=case_id,  # type: ignore[arg-type]
        exported_at=exported_at.isoformat(timespec="seconds"), medsynth_version=__version__,
        software=software, removed_fields=case.redacted, anonymous=case.privacy.anonymous()[0]).to_json()
    if fmt == "nifti":
        files = write_nifti_case(case, folder, case_id, naming)
    elif fmt == "dicom":
        files = write_dicom_case(case, folder, case_id, exported_at, provenance)
    else:
        raise MedSynthError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    medsynth_io.write_json(provenance, folder / "provenance.json")
    (folder / "README.txt").write_text(_readme(case_id, fmt, naming, files + ["provenance.json"], provenance,
                                               case.anatomy))
    return folder


def export_cases(folders: Sequence[str | os.PathLike[str]], export_root: str | os.PathLike[str], fmt: str, *,
                 naming: str = "brats2021", case_id: str | None = None, overwrite: bool = False,
                 anonymous: bool = False, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Export synthetic case folders into ``export_root/<case-id>/``.

    Every input is read and checked, and every target checked, before anything
    is written; the cases are then built in one hidden temporary folder inside
    ``export_root`` and moved into place only when all are complete.  Progress:
    ``progress`` is called twice per case (checked, written).

    With ``anonymous`` every case must pass
    :meth:`~MedSynthLib.schema.provenance.PrivacyRecord.anonymous` (anatomy not a patient's,
    tumour drawn by MedSynth, not overlapping the source patient's own) and have the template's voxels
    (:mod:`.template_check`); one that does not is refused.

    Raises:
        InputError: a bad input case (files not as synthesised included), a case that is not
            anonymous under ``anonymous``, a bad case id (for an anonymous case, one naming a source case), an
            unwritable target, an export folder that is or
            lies inside an input case folder, a target case folder that is an input (even with ``overwrite``).
        OutputExistsError: a target case folder exists and ``overwrite`` is false.
    """
    from ..schema.volume_io import check_writable

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
    _check_outside_the_inputs(root, folders)

    # 1. Check every input (a single case is kept in memory, a batch is read again when written).
    ids: list[str] = []
    kept: SyntheticCase | None = None
    seen: dict[str, Path] = {}
    for folder in folders:
        case = read_synthetic_case(folder)
        if anonymous and case.anatomy_problem is not None:
            path, why = case.anatomy_problem
            raise InputError(path, f"the case's anatomy is not the template's, although its provenance says so: "
                                   f"{why}; --anonymous exports only a tumour MedSynth drew in the healthy template")
        if anonymous:
            ok, reason = case.privacy.anonymous()
            if not ok:
                raise InputError(folder, f"not anonymous: {reason}; --anonymous exports only a tumour MedSynth "
                                         "drew (medsynth tumour new) in the healthy template")
        if case_id is not None:
            check_case_id_for(case, case_id, folder)
            check_case_id_not_a_source(case, case_id, folder)
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
    check_writable(targets, overwrite, inputs=folders)  # a case id naming an input beside it: never replaced

    # 2. Build everything in a hidden staging folder, then move each case into place.
    created = [parent for parent in [root, *root.parents] if not parent.exists()]  # innermost first
    staging: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        from ..schema.outputs import STAGE_MARK, clean_stale_staging

        clean_stale_staging(root / EXPORT_STAGE)  # what a killed export left (kill -9: no cleanup of its own ran)
        staging = Path(tempfile.mkdtemp(prefix=f".{EXPORT_STAGE}{STAGE_MARK}{os.getpid()}-", suffix=".tmp", dir=root))
        exported_at = datetime.now(timezone.utc).replace(microsecond=0)
        for folder, cid in zip(folders, ids):
            case = kept if kept is not None else read_synthetic_case(folder)
            (staging / cid).mkdir()
            export_case(case, staging / cid, fmt, cid, naming, exported_at)
            os.chmod(staging / cid, 0o777 & ~_umask())
            step(f"written {cid}")
        from ..schema.outputs import signals_deferred

        with signals_deferred():  # between the two renames of a case its folder would be gone
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


def _check_outside_the_inputs(root: Path, folders: Sequence[Path]) -> None:
    """Refuse an export folder that is, or lies inside, one of the input case folders (links and '..' resolved).

    An export folder that holds an input is allowed (``export synth_out -o .``): the cases land beside it, and a
    case folder of the export that would be an input is refused by :func:`check_writable`.
    """
    from ..schema.volume_io import enclosing_folder

    resolved = root.resolve()
    same = next((folder for folder in folders if folder.resolve() == resolved), None)
    if same is not None:
        raise InputError(root, f"is the input case folder {same}: write the export outside the case folders")
    inside = enclosing_folder(root, folders)
    if inside is not None:
        raise InputError(root, f"lies inside the input case folder {inside}: write the export outside the case "
                               "folders")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["FORMATS", "MODALITIES", "SyntheticCase", "read_synthetic_case", "default_case_id", "check_case_id",
           "export_case", "export_cases"]
