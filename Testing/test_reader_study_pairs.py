"""The reader study and the review page with what users actually give them.

* A synthetic case made from one of the study's own real cases (its anatomy, or its tumour in place) puts one
  patient in front of the reader twice, real and synthetic: the study refuses such a pair in one line naming
  both cases, unless ``--allow-paired`` asks for a paired study, which records the pairs in the plan and the
  summary.
* ``medsynth review`` and the reader study read a case written by ``medsynth export`` (BraTS file names), not
  only MedSynth's own case-folder layout.

The synthetic cases are written by MedSynth's own writer (:func:`write_case_folder`) from label maps derived from
phantom patients, with painted intensities standing in for the network.
"""

from __future__ import annotations

import json
import socket
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import phantom, write_phantom_case, write_volume
from MedSynthLib import cli
from MedSynthLib.cases.anatomy import derive_label_map
from MedSynthLib.cases.kmeans_anatomy import GaussianMixtureMRF
from MedSynthLib.cases.readers import read_case
from MedSynthLib.evaluation.reader_study import ReaderStudy, open_case, plan_study, write_summary
from MedSynthLib.export.package import export_cases
from MedSynthLib.schema.errors import MedSynthError
from MedSynthLib.schema.grid import LabelMap
from MedSynthLib.schema.labels import MODALITIES, Label
from MedSynthLib.schema.provenance import privacy_of
from MedSynthLib.schema.review import save_review
from MedSynthLib.synthesis.case_folder import case_provenance, write_case_folder

MODEL = SimpleNamespace(name="test-model", sha256="0" * 64)
#: Intensity per label (background, CSF, GM, WM, NCR, ED, ET) of the painted "synthesis".
PAINT = {"t1": (0, 300, 650, 900, 350, 520, 700), "t1ce": (0, 300, 650, 900, 380, 540, 1450),
         "t2": (0, 1300, 950, 700, 1300, 1700, 1200), "flair": (0, 1050, 875, 750, 1000, 1350, 1100)}


#: Every phantom has one brain and one tumour: these put them elsewhere, as another patient's (brain-mask Dice
#: 0.85-0.91 and tumour Dice 0 between any two of the phantom and these, as between two BraTS patients).
def mirrored_front_to_back(array: np.ndarray) -> np.ndarray:
    return np.roll(array[:, ::-1], 2, axis=2)


def mirrored_left_to_right(array: np.ndarray) -> np.ndarray:
    return np.roll(array[:, :, ::-1], 2, axis=0)


def other_patient(root: Path, name: str, move=mirrored_front_to_back, seed: int = 40) -> Path:
    """A phantom patient in BraTS 2021 naming whose brain and tumour are moved by ``move``."""
    images, seg = phantom(seed=seed)
    for modality, array in images.items():
        write_volume(move(array), root / name / f"{name}_{modality}.nii.gz")
    write_volume(move(seg), root / name / f"{name}_seg.nii.gz")
    return root / name


def synthesise(labelmap: LabelMap, out: Path, seed: int = 0) -> Path:
    """A synthetic case folder as ``medsynth synthesize`` writes it, from ``labelmap``."""
    rng = np.random.default_rng(seed)
    brain = labelmap.array > 0
    images = {m: (np.asarray(PAINT[m], np.float32)[labelmap.array] + rng.normal(0, 20, brain.shape) * brain)
              .clip(0).astype(np.float32) for m in MODALITIES}
    provenance = case_provenance(MODEL, labelmap, privacy_of(labelmap), seed=seed, device="cpu", precision="fp32")
    return write_case_folder(labelmap, images, provenance, out)


def derived(case_dir: Path) -> LabelMap:
    return derive_label_map(read_case(case_dir), GaussianMixtureMRF())


@pytest.fixture(scope="module")
def study_cases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    real = [write_phantom_case(root / "real", 0), other_patient(root / "real", "Real_001", mirrored_left_to_right)]
    outside = other_patient(root / "outside", "Outside_001")  # a patient who is not in the study
    unrelated = derived(outside)
    own = derived(real[0])
    # The tumour of the study's first patient copied, in place, into another brain (insert_tumour).
    array = unrelated.array.copy()
    tumour = own.array >= Label.NCR
    array[array >= Label.NCR] = Label.WM
    array[tumour] = own.array[tumour]
    inserted = LabelMap(array, unrelated.grid, [*unrelated.history, {"name": "insert_tumour", "params": {
        "keep_existing": False}, "schema_version": 1}])
    return {"real0": real[0], "real1": real[1],
            "unrelated0": synthesise(unrelated, root / "synthetic" / "unrelated0", seed=1),
            "unrelated1": synthesise(unrelated, root / "synthetic" / "unrelated1", seed=2),
            "from_real0": synthesise(own, root / "synthetic" / "from_real0", seed=3),
            "tumour_of_real0": synthesise(inserted, root / "synthetic" / "tumour_of_real0", seed=4)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _needs_web() -> None:
    if find_spec("trame_slicer") is None:
        pytest.skip("trame_slicer not installed (pip install -e '.[web]')")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- pairs of one patient -------------------------------------------------------------------------


def test_unrelated_synthetic_cases_are_not_pairs(study_cases):
    plan = plan_study([study_cases["real0"], study_cases["real1"]],
                      [study_cases["unrelated0"], study_cases["unrelated1"]], seed=0)
    assert plan["paired"] == {"allowed": False, "pairs": []}


@pytest.mark.parametrize("synthetic, shares", [("from_real0", "brain"), ("tumour_of_real0", "tumour")])
def test_a_synthetic_case_of_a_study_patient_is_refused_naming_both(study_cases, synthetic, shares):
    real = [study_cases["real0"], study_cases["real1"]]
    with pytest.raises(MedSynthError) as error:
        plan_study(real, [study_cases["unrelated0"], study_cases[synthetic]], seed=0)
    message = str(error.value)
    assert "\n" not in message
    assert str(study_cases[synthetic]) in message and str(study_cases["real0"].resolve()) in message
    assert shares in message and "--allow-paired" in message
    assert str(study_cases["real1"].resolve()) not in message  # another patient: no pair


def test_cli_refuses_a_pair_in_one_line_and_writes_nothing(study_cases, tmp_path, capsys):
    _needs_web()
    results = tmp_path / "results"
    args = ["review", "--study", str(study_cases["real0"]), str(study_cases["real1"]),
            "--synthetic", str(study_cases["unrelated0"]), str(study_cases["from_real0"]),
            "-o", str(results), "--port", str(_free_port())]
    assert cli.main(args) == 2
    err = _one_line(capsys)
    assert str(study_cases["from_real0"]) in err and str(study_cases["real0"].resolve()) in err
    assert not results.exists() and not any(tmp_path.iterdir())


def test_allow_paired_records_the_pairs_in_the_plan_and_the_summary(study_cases, tmp_path):
    real = [study_cases["real0"], study_cases["real1"]]
    synthetic = [study_cases["unrelated0"], study_cases["from_real0"]]
    results = tmp_path / "results"
    study = ReaderStudy.create_or_resume(results, real, synthetic, seed=0, allow_paired=True)
    plan = json.loads((results / "study_plan.json").read_text())
    assert plan["paired"]["allowed"] is True and plan["inputs"]["allow_paired"] is True
    (pair,) = plan["paired"]["pairs"]
    assert pair["real"] == str(study_cases["real0"].resolve())
    assert pair["synthetic"] == str(study_cases["from_real0"].resolve())
    assert "brain" in pair["shares"] and pair["brain_dice"] == pytest.approx(1.0)
    for item in study.items:  # answer everything "real": right on the real items only
        study.answer(item.item_id, "real", 2)
    study.close()
    summary = write_summary(results)
    paired = summary["paired"]
    assert paired["pairs"] == plan["paired"]["pairs"]
    of_pairs = {i["item_id"] for i in plan["items"] if i["case"] in (pair["real"], pair["synthetic"])}
    assert paired["items_of_paired_cases"]["n"] == len(of_pairs) > 0
    assert paired["items_of_paired_cases"]["n"] + paired["other_items"]["n"] == len(plan["items"])
    text = (results / "summary.md").read_text()
    assert "paired" in text.lower() and study_cases["from_real0"].name in text and study_cases["real0"].name in text
    # A resume must be the same kind of study: without the flag it is refused, saying so.
    with pytest.raises(MedSynthError, match="--allow-paired"):
        ReaderStudy.create_or_resume(results, real, synthetic, seed=0)
    ReaderStudy.create_or_resume(results, real, synthetic, seed=0, allow_paired=True).close()


def test_an_unpaired_summary_says_nothing_of_pairs(study_cases, tmp_path):
    results = tmp_path / "results"
    ReaderStudy.create_or_resume(results, [study_cases["real0"]], [study_cases["unrelated0"]], seed=0).close()
    assert "paired" not in write_summary(results)
    assert "paired" not in (results / "summary.md").read_text().lower()


def test_cli_allow_paired_reaches_the_study(study_cases, tmp_path, capsys, monkeypatch):
    _needs_web()
    import MedSynthWeb.cli as web_cli

    monkeypatch.setattr(web_cli, "_start", lambda app, args, what: None)  # build the page, serve nothing
    results = tmp_path / "results"
    args = ["review", "--study", str(study_cases["real0"]), "--synthetic", str(study_cases["from_real0"]),
            "-o", str(results), "--port", str(_free_port()), "--allow-paired"]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert len(json.loads((results / "study_plan.json").read_text())["paired"]["pairs"]) == 1
    assert cli.main(["review", str(study_cases["real0"]), "--allow-paired"]) == 2
    assert "--study" in _one_line(capsys)


# --- review of an exported case ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=["brats2021", "brats2023"])
def exported(request, study_cases, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    (folder,) = export_cases([study_cases["unrelated0"]], root, "nifti", naming=request.param)
    return folder


def test_an_exported_case_opens_as_a_synthetic_case(exported, study_cases):
    case = open_case(exported)
    original = open_case(study_cases["unrelated0"])
    assert case.synthetic and set(case.files) == set(MODALITIES)
    assert all(path.parent == exported and path.name.startswith(exported.name) for path in case.files.values())
    np.testing.assert_array_equal(case.tumour, original.tumour)


def test_review_entries_and_ratings_of_an_exported_case(exported, study_cases):
    _needs_web()
    from MedSynthWeb.cli import review_entries

    (entry,) = review_entries([exported], [])
    assert entry.synthetic is not None and entry.synthetic.folder == exported.resolve()
    (entry,) = review_entries([], [(exported, study_cases["real0"])])
    assert entry.synthetic is not None and entry.real is not None


def test_save_review_of_an_exported_case_keeps_its_provenance_free_of_notes(exported):
    before = json.loads((exported / "provenance.json").read_text())
    review = save_review(exported, 4)
    after = json.loads((exported / "provenance.json").read_text())
    assert after["review"] == review and review["rating"] == 4
    assert {k: v for k, v in after.items() if k != "review"} == {k: v for k, v in before.items() if k != "review"}
    # The export's provenance is what is shared; a note is free text a shared file must not carry.
    with pytest.raises(MedSynthError, match="note"):
        save_review(exported, 3, "looks like patient Smith")
    assert json.loads((exported / "provenance.json").read_text()) == after


def test_cli_review_serves_an_exported_case(exported, capsys, monkeypatch):
    _needs_web()
    import MedSynthWeb.cli as web_cli

    monkeypatch.setattr(web_cli, "_start", lambda app, args, what: None)
    assert cli.main(["review", str(exported), "--port", str(_free_port())]) == 0, capsys.readouterr().err


def test_an_exported_copy_of_a_paired_case_is_a_pair_too(study_cases, tmp_path):
    (folder,) = export_cases([study_cases["from_real0"]], tmp_path / "export", "nifti")
    with pytest.raises(MedSynthError, match="brain") as error:
        plan_study([study_cases["real0"]], [folder])
    assert str(folder) in str(error.value)


def test_a_dicom_export_is_refused_in_one_line(study_cases, tmp_path):
    (folder,) = export_cases([study_cases["unrelated0"]], tmp_path / "export", "dicom")
    with pytest.raises(MedSynthError, match="DICOM") as error:
        open_case(folder)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)
