"""A case folder of a ``medsynth generate`` dataset (BraTS 2021/2023 layouts) is a MedSynth output.

Such a folder holds only images and the tumour segmentation in BraTS naming; its provenance is the dataset's
``provenance/<case id>.json``.  Read as a patient's case it would hand synthetic images to ``labels`` and to
``synthesize --context``; ``export`` has to verify and sanitise it as it does a ``synthesize`` folder.

One small dataset per layout, made once per session with phantom patients, a random-weight tiny model and the
template (see test_generate.py).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import file_tree, one_line_refusal, run_cli as run, write_phantom_case, write_random_model
from MedSynthLib.cli import main
from MedSynthLib.schema.labels import schema_to_tumour, tumour_to_schema
from MedSynthLib.schema.provenance import file_sha256
from MedSynthLib.synthesis.case_folder import is_medsynth_output
from MedSynthLib.synthesis.networks import MODALITY_ORDER

#: Both kinds draw in a patient's brain: neither case is anonymous.
PATIENT_CONFIG = {"kinds": {"transform": 1, "parametric": 1},
                  "transform": {"translate_mm": 3, "rotate_deg": 15, "scale_range": [0.9, 1.1]},
                  "parametric": {"radius_fraction": [0.15, 0.25]}}
SUFFIXES = {"brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
            "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"}}
#: Words of the dataset that must not reach an export: its name (a dataset or case name can name a patient or a
#: site) and the prefix of its source ids (a hash of a patient's files).
DATASET_NAME = "HospitalDoeMRN12345"


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> dict[str, Path]:
    """A BraTS 2021 dataset of two cases drawn in phantom patients' brains and a BraTS 2023 dataset of one
    anonymous case (a parametric tumour in the template)."""
    root = tmp_path_factory.mktemp("generated_case_folders")
    for k in range(2):
        write_phantom_case(root / "cases", seed=k, case_id=f"P{k}")
    model = write_random_model(root / "tiny", {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=2018)
    config = root / "sampler.json"
    config.write_text(json.dumps(PATIENT_CONFIG))
    common = ["--model", str(model), "--device", "cpu", "--precision", "fp32", "--seed", "7", "--quiet",
              "--name", DATASET_NAME]
    assert main(["generate", "-n", "2", "--labels-from", str(root / "cases"), "--edits", str(config),
                 "--layout", "brats2021", "-o", str(root / "patient_ds"), *common]) == 0
    assert main(["generate", "-n", "1", "--template", "--anonymous", "--layout", "brats2023",
                 "-o", str(root / "anonymous_ds"), *common]) == 0
    return {"root": root, "cases": root / "cases", "model": model,
            "patient": root / "patient_ds" / f"{DATASET_NAME}_00000",
            "patient_ds": root / "patient_ds",
            "anonymous": root / "anonymous_ds" / f"{DATASET_NAME}-00000-000",
            "anonymous_ds": root / "anonymous_ds"}


def _record(case: Path) -> dict:
    return json.loads((case.parent / "provenance" / f"{case.name}.json").read_text())


def _files(case: Path, layout: str) -> dict[str, Path]:
    return {key: case / f"{case.name}{suffix}.nii.gz" for key, suffix in SUFFIXES[layout].items()}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- every command takes it for a MedSynth output --------------------------------------------------------------


def test_a_generated_case_folder_is_a_medsynth_output(generated, tmp_path):
    """is_medsynth_output looked only for the folder's own provenance.json, so a generate case folder (its
    provenance in the dataset's provenance/) read as a patient's scans."""
    for name in ("patient", "anonymous"):
        assert is_medsynth_output(generated[name]), name
    link = tmp_path / "a_link"
    link.symlink_to(generated["patient"], target_is_directory=True)
    assert is_medsynth_output(link)  # a link to a case folder finds its dataset
    # The dataset's other folders and a patient's own case folder are not case folders MedSynth wrote.
    for folder in (generated["patient_ds"], generated["patient_ds"] / "provenance", generated["cases"] / "P0"):
        assert not is_medsynth_output(folder), folder
    # A copy of the case folder away from its dataset has no provenance: not recognised (nor exportable).
    shutil.copytree(generated["patient"], tmp_path / generated["patient"].name)
    assert not is_medsynth_output(tmp_path / generated["patient"].name)


def test_slicer_load_case_names_where_a_generated_cases_labels_are(generated, tmp_path):
    """The Slicer module's *Load case* refuses a generate case folder (a MedSynth output), and its message said
    'its label map is labels.nii.gz in it', a file such a folder does not have; it names the case's own
    segmentation and the dataset's record, as the command line does."""
    import sys

    pytest.importorskip("slicer", reason="slicer-core is not installed; pip install -e '.[test]'")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSynth"))
    from MedSynthSlicerLib import mrml
    from MedSynthSlicerLib.errors import WorkflowError
    from MedSynthSlicerLib.logic import WorkflowLogic

    case = generated["patient"]
    scene, _ = mrml.create_headless_scene()
    logic = WorkflowLogic(scene, work_dir=tmp_path / "work")
    with pytest.raises(WorkflowError) as refused:
        logic.load_case(case)
    message = str(refused.value)
    assert "MedSynth output" in message and f"{case.name}_seg.nii.gz" in message, message
    assert "labels.nii.gz in it" not in message, message


def test_labels_refuses_a_generated_case_folder(generated, tmp_path, capsys):
    """``medsynth labels`` derived a label map from a generated case's synthetic images as if they were a
    patient's scans; it refuses the folder in one line (exit 2), writing nothing."""
    case = generated["patient"]
    before = file_tree(generated["patient_ds"])
    output = tmp_path / "labels.nii.gz"
    line = one_line_refusal(*run(["labels", case, "-o", output], capsys))
    assert str(case) in line and "MedSynth output" in line, line
    assert f"{case.name}_seg.nii.gz" in line and "labels.nii.gz" not in line  # where its labels are, not a guess
    assert list(tmp_path.iterdir()) == []
    assert file_tree(generated["patient_ds"]) == before


def test_synthesize_context_refuses_a_generated_case_folder(generated, tmp_path, capsys):
    """``synthesize --context`` refuses a MedSynth output as the patient's scan (as it does a synthesize case
    folder): a generate case folder was taken for the patient's images."""
    labels = tmp_path / "maps" / "P0_labels.nii.gz"
    rc, _, err = run(["labels", generated["cases"] / "P0", "-o", labels], capsys)
    assert rc == 0, err
    before = file_tree(generated["patient_ds"])
    output = tmp_path / "inpainted"
    line = one_line_refusal(*run(["synthesize", labels, "--context", generated["patient"], "--model",
                                   generated["model"], "--device", "cpu", "-o", output], capsys))
    assert str(generated["patient"]) in line and "MedSynth output" in line, line
    assert not output.exists()
    assert file_tree(generated["patient_ds"]) == before


def test_info_describes_a_generated_case_folder(generated, capsys):
    """``info`` says a generate case folder is a MedSynth output, with its own file names and tumour."""
    case = generated["patient"]
    rc, out, err = run(["info", case, "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    files = _files(case, "brats2021")
    assert info["medsynth_output"]["images"] == "synthetic"
    assert info["modalities"] == {m: files[m].name for m in ("t1", "t1ce", "t2", "flair")}
    assert info["medsynth_output"]["label_map"] == files["seg"].name
    tumour = tumour_to_schema(_array(files["seg"]), "brats2021")
    assert info["tumour_voxels"] == {"NCR": int((tumour == 4).sum()), "ED": int((tumour == 5).sum()),
                                     "ET": int((tumour == 6).sum())}
    rc, out, err = run(["info", case], capsys)
    assert rc == 0 and "MedSynth output" in out, err


# --- export ----------------------------------------------------------------------------------------------------


def test_generate_records_each_files_sha256(generated):
    """Export verifies a case's files against the sha256 recorded when they were written: generate records it."""
    for name, layout in (("patient", "brats2021"), ("anonymous", "brats2023")):
        case = generated[name]
        recorded = _record(case)["files_sha256"]
        assert recorded == {key: file_sha256(path) for key, path in _files(case, layout).items()}


def _no_dataset_word_anywhere(folder: Path, words: list[bytes]) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 4
    for path in files:
        data = path.read_bytes()
        for blob in [str(path.relative_to(folder)).encode(), data] + (
                [gzip.decompress(data)] if path.name.endswith(".gz") else []):
            for word in words:
                assert word not in blob, f"{word!r} in {path.relative_to(folder)}"


@pytest.mark.parametrize("naming", ["brats2021", "brats2023"])
def test_a_generated_case_exports_as_nifti(generated, naming, tmp_path, capsys):
    """``export`` refused a generate case folder (no t1.nii.gz); it now exports it as it does a synthesize case:
    images and tumour labels voxel for voxel, provenance sanitised (no dataset or source name, no generation
    record), NOT anonymous for a case drawn in a patient's brain.  The dataset holds no anatomy label map, so the
    export has none either (no file of zeros standing for one)."""
    case = generated["patient"]
    before = file_tree(generated["patient_ds"])
    rc, out, err = run(["export", case, "--format", "nifti", "--naming", naming, "-o", tmp_path / "exp"], capsys)
    assert rc == 0, err
    assert "NOT anonymous" in out
    (exported,) = [p for p in (tmp_path / "exp").iterdir()]
    cid = exported.name
    files = _files(case, "brats2021")
    suffixes = SUFFIXES[naming]
    for modality in ("t1", "t1ce", "t2", "flair"):
        written = _array(exported / f"{cid}{suffixes[modality]}.nii.gz")
        np.testing.assert_array_equal(written, _array(files[modality]))
    tumour = tumour_to_schema(_array(files["seg"]), "brats2021")
    np.testing.assert_array_equal(_array(exported / f"{cid}{suffixes['seg']}.nii.gz"),
                                  schema_to_tumour(tumour, naming))
    assert not any("anatomy" in p.name for p in exported.iterdir())
    readme = (exported / "README.txt").read_text()
    assert "NOT anonymous" in readme and "anatomy labels (1 CSF" not in readme
    provenance = json.loads((exported / "provenance.json").read_text())
    assert provenance["privacy"]["anonymous"] is False and provenance["privacy"]["anatomy"] == "patient"
    for key in ("generation", "case_id", "layout", "files", "files_sha256", "tumour", "edit_grid", "images_sha256",
                "stages", "worker"):
        assert key not in provenance, key
    # The tiny model is not registered: its name is the one field removed (the dataset's bookkeeping is not one).
    assert provenance["model"]["name"] == "unregistered" and provenance["export"]["removed_fields"] == 1
    _no_dataset_word_anywhere(exported, [DATASET_NAME.encode(), b"sha256:", str(generated["root"]).encode()])
    assert file_tree(generated["patient_ds"]) == before


def test_a_generated_case_exports_as_dicom(generated, tmp_path, capsys):
    case = generated["patient"]
    rc, out, err = run(["export", case, "--format", "dicom", "-o", tmp_path / "exp"], capsys)
    assert rc == 0, err
    (exported,) = [p for p in (tmp_path / "exp").iterdir()]
    datasets = [pydicom.dcmread(p) for p in sorted(exported.rglob("*.dcm"))]
    assert {p.parent.name for p in exported.rglob("*.dcm")} == {"T1", "T1ce", "T2", "FLAIR", "SEG"}
    for ds in datasets:
        assert ds.SyntheticData == "YES" and ds.PatientIdentityRemoved == "NO"
        assert str(ds.PatientName).startswith("NOT-ANONYMOUS^")
    _no_dataset_word_anywhere(exported, [DATASET_NAME.encode(), b"sha256:", str(generated["root"]).encode()])


def test_an_anonymous_generated_case_exports_with_anonymous(generated, tmp_path, capsys):
    """--anonymous lets through the anonymous dataset's case (a parametric tumour in the template) and refuses a
    case drawn in a patient's brain."""
    rc, out, err = run(["export", generated["anonymous"], "--format", "dicom", "--anonymous",
                        "-o", tmp_path / "anon"], capsys)
    assert rc == 0, err
    (exported,) = [p for p in (tmp_path / "anon").iterdir()]
    provenance = json.loads((exported / "provenance.json").read_text())
    assert provenance["privacy"]["anonymous"] is True and provenance["export"]["anonymous"] is True
    ds = pydicom.dcmread(next((exported / "T1").glob("*.dcm")), stop_before_pixels=True)
    assert str(ds.PatientName).startswith("SYNTHETIC^") and ds.PatientIdentityRemoved == "YES"
    _no_dataset_word_anywhere(exported, [DATASET_NAME.encode(), b"sha256:", str(generated["root"]).encode()])
    line = one_line_refusal(*run(["export", generated["patient"], "--format", "nifti", "--anonymous",
                                   "-o", tmp_path / "refused"], capsys))
    assert "not anonymous" in line and str(generated["patient"]) in line
    assert not (tmp_path / "refused").exists()


def _copy(generated: dict[str, Path], tmp: Path, name: str = "patient") -> Path:
    dataset = shutil.copytree(generated[f"{name}_ds"], tmp / "ds", symlinks=True)
    return dataset / generated[name].name


def _edit_record(case: Path, change) -> None:
    path = case.parent / "provenance" / f"{case.name}.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _t1_replaced(generated, tmp):
    case = _copy(generated, tmp)
    other = generated["cases"] / "P1" / "P1_t1.nii.gz"  # a patient's scan on the same grid
    shutil.copyfile(other, case / f"{case.name}_t1.nii.gz")
    return case, [], f"{case.name}_t1.nii.gz: does not match the sha256 recorded"


def _t1_linked(generated, tmp):
    case = _copy(generated, tmp)
    (case / f"{case.name}_t1.nii.gz").unlink()
    (case / f"{case.name}_t1.nii.gz").symlink_to(generated["cases"] / "P1" / "P1_t1.nii.gz")
    return case, [], "is a link"


def _seg_replaced(generated, tmp):
    case = _copy(generated, tmp)
    shutil.copyfile(generated["cases"] / "P1" / "P1_seg.nii.gz", case / f"{case.name}_seg.nii.gz")
    return case, [], f"{case.name}_seg.nii.gz: does not match the sha256 recorded"


def _t2_missing(generated, tmp):
    case = _copy(generated, tmp)
    (case / f"{case.name}_t2.nii.gz").unlink()
    return case, [], f"{case.name}_t2.nii.gz: missing"


def _no_file_checksums(generated, tmp):
    case = _copy(generated, tmp)
    _edit_record(case, lambda record: record.pop("files_sha256"))
    return case, [], "records no file checksums"


def _claimed_anonymous(generated, tmp):
    """A record edited to call a case drawn in a patient's brain anonymous: its generation record says otherwise."""
    case = _copy(generated, tmp)

    def claim(record):
        record["privacy"].update(anatomy="template", brain_dice_to_source=None, tumour_dice_to_source=None,
                                 tumour_origin="parametric", anonymous=True)
    _edit_record(case, claim)
    return case, ["--anonymous"], "not anonymous"


def _claim_template(record) -> None:
    record["generation"].update(kind="parametric", base="template", tumour_source=None)
    record["privacy"].update(anatomy="template", brain_dice_to_source=None, tumour_dice_to_source=None,
                             tumour_origin="parametric", anonymous=True)


def _generation_claims_the_template(generated, tmp):
    """Audit 47: a case drawn in a patient's brain whose record (privacy and generation) was edited to say a
    parametric tumour in the template passed --anonymous.  Its voxels are not on the template's grid."""
    case = _copy(generated, tmp)
    _edit_record(case, _claim_template)
    return case, ["--anonymous"], f"{case.name}_seg.nii.gz: the case's anatomy is not the template's"


def _moved(path: Path, shift: int) -> None:
    """The file's voxels moved ``shift`` voxels along j, on its own grid."""
    image = sitk.ReadImage(str(path))
    moved = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(image), shift, axis=1))
    moved.CopyInformation(image)
    sitk.WriteImage(moved, str(path), useCompression=True)


def _rehash_generated(case: Path, layout: str) -> None:
    keys = {"labels": "seg"}
    _edit_record(case, lambda record: record["files_sha256"].update(
        {keys.get(key, key): file_sha256(path) for key, path in _files(case, layout).items()}))


def _anonymous_images_of_another_brain(generated, tmp):
    """The anonymous case's images replaced by another brain on the template's grid (the template's moved 4 mm,
    standing for a patient's registered to it), the checksums recorded again."""
    case = _copy(generated, tmp, "anonymous")
    for key, path in _files(case, "brats2023").items():
        if key != "seg":
            _moved(path, 4)
    _rehash_generated(case, "brats2023")
    return case, ["--anonymous"], f"{case.name}-t1n.nii.gz: the case's anatomy is not the template's"


def _anonymous_tumour_elsewhere(generated, tmp):
    """The anonymous case's tumour moved where its recorded edits draw none (a real tumour put in its place would
    be found the same way), the checksums recorded again."""
    case = _copy(generated, tmp, "anonymous")
    _moved(_files(case, "brats2023")["seg"], 30)
    _rehash_generated(case, "brats2023")
    return case, ["--anonymous"], f"{case.name}-seg.nii.gz: the case's anatomy is not the template's"


def _not_synthetic(generated, tmp):
    case = _copy(generated, tmp)
    _edit_record(case, lambda record: record.update(synthetic=False))
    return case, [], "only synthetic cases can be exported"


@pytest.mark.parametrize("build", [_t1_replaced, _t1_linked, _seg_replaced, _t2_missing, _no_file_checksums,
                                   _claimed_anonymous, _not_synthetic, _generation_claims_the_template,
                                   _anonymous_images_of_another_brain, _anonymous_tumour_elsewhere],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_generated_case_not_as_written_is_refused(generated, build, tmp_path, capsys):
    """The checks of a synthesize case folder: every file a regular file with the sha256 recorded when it was
    written, a privacy record that the case's own generation record bears out, and for an anonymous one voxels
    that do (the template's grid and brain, the tumour where its recorded edits draw one)."""
    case, extra, words = build(generated, tmp_path)
    before = file_tree(tmp_path)
    line = one_line_refusal(*run(["export", case, "--format", "nifti", *extra, "-o", tmp_path / "exp"], capsys))
    assert words in line, line
    assert file_tree(tmp_path) == before and not (tmp_path / "exp").exists()
