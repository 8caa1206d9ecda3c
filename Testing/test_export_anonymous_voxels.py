"""``export --anonymous`` checks a case's anonymous claim against its voxels, not only its JSON (privacy audit 47).

A case folder's privacy record, its label map's history and the sha256 of its files are all written by whoever
wrote the folder: a patient's synthetic case with its history edited to begin at the template, its privacy record
and the sidecar's hash updated, was exported as anonymous (Patient Identity Removed YES) with the patient's
anatomy voxel for voxel.  A case that says it is drawn in the healthy template must be on the template's grid,
hold the template's labels outside what its recorded tumour edits change, and its images the template's brain.

The template cases here are real: the shipped ICBM152 label map with parametric tumours, written as ``synthesize``
writes a case folder (images painted from the labels, no network), and one made end to end by ``demo``,
``tumour new`` and ``synthesize`` with a random-weight tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import file_tree, one_line_refusal, run_cli as run, write_random_model
from MedSynthLib.cases.template import template_label_map
from MedSynthLib.export import read_synthetic_case
from MedSynthLib.schema.errors import InputError
from MedSynthLib.schema.labels import Label
from MedSynthLib.schema.provenance import PrivacyRecord, array_sha256, file_sha256
from test_export import PARAMETRIC_STEP, TEMPLATE_STEP, anonymous_case, painted_images, patient_anatomy_case

ANONYMOUS_PRIVACY = {"anatomy": "template", "brain_dice_to_source": None, "tumour_dice_to_source": None,
                     "tumour_origin": "parametric", "images": "synthetic"}


@pytest.fixture(scope="module")
def template_case(tmp_path_factory) -> Path:
    """A case folder of two parametric tumours in the template, written as ``synthesize`` writes one."""
    return anonymous_case(tmp_path_factory.mktemp("template_case") / "synth_out")


def _copy(case: Path, tmp: Path, name: str = "case") -> Path:
    return Path(shutil.copytree(case, tmp / name))


def _write_like(array: np.ndarray, path: Path) -> None:
    """Overwrite a case file with ``array`` on the file's own grid."""
    reference = sitk.ReadImage(str(path))
    image = sitk.GetImageFromArray(array.astype(sitk.GetArrayViewFromImage(reference).dtype))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=True)


def _rehash(case: Path, change=None) -> None:
    """Record the files' sha256 (and the labels' hash) again, as someone forging the folder would."""
    provenance = json.loads((case / "provenance.json").read_text())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nii.gz")))
    sidecar = json.loads((case / "labels.json").read_text())
    sidecar["labels_sha256"] = provenance["labels_sha256"] = array_sha256(labels)
    if change is not None:
        change(provenance, sidecar)
    (case / "labels.json").write_text(json.dumps(sidecar))
    provenance["files"] = {name: file_sha256(case / name) for name in provenance["files"]}
    (case / "provenance.json").write_text(json.dumps(provenance))


def _claim_template(provenance: dict, sidecar: dict) -> None:
    """The audit's forgery: the history begins at the template, the privacy says template and parametric."""
    history = [TEMPLATE_STEP, PARAMETRIC_STEP]
    provenance["edits"] = sidecar["history"] = history
    provenance["privacy"] = sidecar["privacy"] = dict(ANONYMOUS_PRIVACY)


def _patient_relabelled(tmp: Path, template_case: Path) -> tuple[Path, str]:
    """A whole synthetic case of a patient's label map (on the patient's grid) whose JSON claims the template."""
    case = patient_anatomy_case(tmp / "case")
    _rehash(case, _claim_template)
    return case, "labels.nii.gz"


def _other_brain_on_the_template_grid(tmp: Path, template_case: Path) -> tuple[Path, str]:
    """Another brain (the template's moved 4 mm, standing for a patient's registered to it) on the template's grid,
    its labels and images consistent, its JSON the template case's."""
    case = _copy(template_case, tmp)
    for name in ("labels", "t1", "t1ce", "t2", "flair"):
        path = case / f"{name}.nii.gz"
        _write_like(np.roll(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), 4, axis=1), path)
    _rehash(case)
    return case, "labels.nii.gz"


def _images_of_another_brain(tmp: Path, template_case: Path) -> tuple[Path, str]:
    """The template's labels beside images of another brain (a scan put in place of the synthetic images)."""
    case = _copy(template_case, tmp)
    for name in ("t1", "t1ce", "t2", "flair"):
        path = case / f"{name}.nii.gz"
        _write_like(np.roll(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), 4, axis=1), path)
    _rehash(case)
    return case, "t1.nii.gz"


def _anatomy_repainted(tmp: Path, template_case: Path) -> tuple[Path, str]:
    """The template's brain outline with other tissue inside (white matter relabelled grey matter far from any
    tumour the history draws), images painted from those labels."""
    case = _copy(template_case, tmp)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nii.gz")))
    k = labels.shape[0] // 4  # low slices: far below both tumours
    labels[:k][labels[:k] == Label.WM] = Label.GM
    _write_like(labels, case / "labels.nii.gz")
    for name, image in painted_images(labels).items():
        _write_like(image, case / f"{name}.nii.gz")
    _rehash(case)
    return case, "labels.nii.gz"


@pytest.mark.parametrize("build", [_patient_relabelled, _other_brain_on_the_template_grid, _images_of_another_brain,
                                   _anatomy_repainted], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_an_anonymous_claim_the_voxels_do_not_bear_out_is_refused(build, fmt, template_case, tmp_path, capsys):
    """Audit 47: a case whose JSON says template anatomy and a parametric tumour, but whose voxels are not the
    template's (another grid, other labels outside the tumour edits, another brain in the images), is refused by
    --anonymous in one line naming the file, exit 2, nothing written; exported without --anonymous it is
    NOT anonymous (its id NOT-ANONYMOUS-, Patient Identity Removed NO)."""
    case, bad_file = build(tmp_path, template_case)
    before = file_tree(tmp_path)
    line = one_line_refusal(*run(["export", case, "--format", fmt, "--anonymous", "-o", tmp_path / "exp"], capsys))
    assert str(case / bad_file) in line and "anatomy is not the template's" in line, line
    assert file_tree(tmp_path) == before and not (tmp_path / "exp").exists()
    read = read_synthetic_case(case)
    assert not read.privacy.anonymous()[0] and read.case_id.startswith("NOT-ANONYMOUS-")
    if fmt == "dicom" and build is _patient_relabelled:  # (the others: a template-sized export, 15 s each)
        rc, _, err = run(["export", case, "--format", "dicom", "-o", tmp_path / "plain"], capsys)
        assert rc == 0, err
        (exported,) = (tmp_path / "plain").iterdir()
        assert exported.name.startswith("NOT-ANONYMOUS-"), exported.name
        ds = pydicom.dcmread(next((exported / "T1").glob("*.dcm")), stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "NO" and str(ds.PatientName).startswith("NOT-ANONYMOUS^")


def test_a_template_case_with_a_tumour_drawn_over_another_exports_as_anonymous(template_case, tmp_path, capsys):
    """The refill where the first tumour was differs from the template's labels: the check replays the history on
    the template and allows exactly what the edits change."""
    template = template_label_map().array
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(template_case / "labels.nii.gz")))
    assert np.count_nonzero((labels != template) & (labels < Label.NCR)) > 1000  # the refilled first tumour
    rc, out, err = run(["export", template_case, "--format", "nifti", "--anonymous", "-o", tmp_path / "exp"], capsys)
    assert rc == 0, err
    (exported,) = (tmp_path / "exp").iterdir()
    assert exported.name.startswith("SYNTH-")
    assert json.loads((exported / "provenance.json").read_text())["export"]["anonymous"] is True


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from MedSynthLib.synthesis.networks import MODALITY_ORDER

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny",
                              {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=0)


def test_demo_and_a_tumour_drawn_in_it_export_as_anonymous(tiny_model, tmp_path, capsys):
    """``demo`` (the template and a parametric tumour), and ``tumour new`` on its label map synthesised: both are
    anonymous, and their voxels say so."""
    model = ["--model", tiny_model, "--device", "cpu", "--precision", "fp32"]
    assert run(["demo", "-o", tmp_path / "demo", *model], capsys)[0] == 0
    assert run(["tumour", "new", tmp_path / "demo" / "labels.nii.gz", "--centre", -30, -12, 26, "--radius", 12,
                "--oedema", 6, "--seed", 3, "-o", tmp_path / "new.nii.gz"], capsys)[0] == 0
    assert run(["synthesize", tmp_path / "new.nii.gz", "-o", tmp_path / "synth", *model], capsys)[0] == 0
    for name in ("demo", "synth"):
        rc, _, err = run(["export", tmp_path / name, "--format", "nifti", "--anonymous", "-o", tmp_path / "exp"],
                         capsys)
        assert rc == 0, err
    assert sorted(p.name[:6] for p in (tmp_path / "exp").iterdir()) == ["SYNTH-", "SYNTH-"]


# --- the record: a patient's anatomy is never anonymous -------------------------------------------------------

@pytest.mark.parametrize("dice", [None, 0.3, 1.0])
def test_a_patients_anatomy_is_not_anonymous_whatever_its_recorded_dice(dice):
    """Audit 47: ``(brain_dice_to_source or 0.0) >= 0.5`` let a patient's anatomy with no recorded Dice (or a low
    one: edits never move the brain outline, so it cannot be) pass as anonymous."""
    for origin in ("parametric", "none"):
        ok, reason = PrivacyRecord("patient", dice, None, origin).anonymous()
        assert not ok and "anatomy is the source patient's own" in reason, reason
    assert PrivacyRecord("template", None, None, "parametric").anonymous()[0]


# --- the case id of an anonymous export may not name a source case ----------------------------------------------

SOURCE_IDS = ["BraTS2021_00000", "brats2021_00000", "Brats18_CBICA_ABM_1", "BraTS-GLI-00000-000", "TCGA-02-0006",
              "tcga-02-0006", "UPENN-GBM-00001", "UCSF-PDGM-0004", "cbica_abm_1", "P0042", "p0042"]


def test_an_anonymous_export_refuses_a_case_id_of_the_source_data(template_case, tmp_path, capsys):
    """Audit 47: ``export CASE --anonymous --case-id BraTS2021_00000`` wrote a patient's case id as the PatientID
    and name with Patient Identity Removed YES.  An id in the form of a public dataset's patient ids, or one the
    case's history records (here in a field the export strips), is refused in one line, exit 2, nothing written;
    another id is the user's to choose."""
    from MedSynthLib.export.package import check_case_id_not_a_source

    case = _copy(template_case, tmp_path)

    def record_source(provenance: dict, sidecar: dict) -> None:
        for history in (provenance["edits"], sidecar["history"]):
            history[0]["params"]["source_case"] = "/data/site/P0042/P0042_t1.nii.gz"
    _rehash(case, record_source)
    read = read_synthetic_case(case)
    assert read.privacy.anonymous()[0]
    for case_id in SOURCE_IDS:
        with pytest.raises(InputError, match="source"):
            check_case_id_not_a_source(read, case_id, case)
    for case_id in ("TRIAL-7", "SYNTH-0001", "P00421", "Study_P004"):
        check_case_id_not_a_source(read, case_id, case)  # not a recorded name, nor a public dataset's id
    before = file_tree(tmp_path)
    for case_id, extra in (("BraTS2021_00000", ["--anonymous"]), ("P0042", []), ("p0042", ["--anonymous"])):
        # An anonymous case is exported as anonymous with or without the flag: its id is checked either way.
        line = one_line_refusal(*run(["export", case, "--format", "dicom", *extra, "--case-id", case_id,
                                       "-o", tmp_path / "exp"], capsys))
        assert case_id in line and "source" in line and str(case) in line, line
        assert file_tree(tmp_path) == before and not (tmp_path / "exp").exists()
    rc, _, err = run(["export", case, "--format", "nifti", "--anonymous", "--case-id", "TRIAL-7",
                      "-o", tmp_path / "exp"], capsys)
    assert rc == 0 and (tmp_path / "exp" / "TRIAL-7").is_dir(), err


def test_a_case_that_is_not_anonymous_may_keep_its_patients_case_id(tmp_path, capsys):
    """A synthetic case of a patient's anatomy is exported NOT anonymous; naming it after its patient is the
    user's choice (research use within the data's terms)."""
    case = patient_anatomy_case(tmp_path / "case")
    rc, _, err = run(["export", case, "--format", "nifti", "--case-id", "BraTS2021_00000", "-o", tmp_path / "e"],
                     capsys)
    assert rc == 0 and (tmp_path / "e" / "BraTS2021_00000").is_dir(), err
