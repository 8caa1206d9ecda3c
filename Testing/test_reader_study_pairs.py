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
from test_web_review import browser  # noqa: F401 - the headless Chromium fixture
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
    return {"real0": real[0], "real1": real[1], "outside": outside,
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


# --- a dataset written by medsynth generate -------------------------------------------------------

#: Sampler edits sized for a phantom brain (as Testing/test_generate.py's): every case keeps its source's brain.
GENERATE_CONFIG = {"kinds": {"transform": 1, "parametric": 1},
                   "transform": {"translate_mm": 3, "rotate_deg": 15, "scale_range": [0.9, 1.1]},
                   "parametric": {"radius_fraction": [0.15, 0.25]}}


@pytest.fixture(scope="module")
def generate_inputs(study_cases, tmp_path_factory) -> dict[str, Path]:
    """A random-weight tiny model, the sampler config and a shared source cache for ``medsynth generate``."""
    import torch

    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator, NetworkConfig

    root = tmp_path_factory.mktemp("generate_inputs")
    network = NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=1, disc_channels=4, disc_layers=2)
    torch.manual_seed(2018)
    state = {k: v.detach().contiguous() for k, v in Generator(network).state_dict().items()}
    model = write_model(root / "tiny", state, {"name": "tiny", "description": "random weights for tests",
                                               "network": network.to_json(),
                                               "intensity": {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}})
    config = root / "sampler.json"
    config.write_text(json.dumps(GENERATE_CONFIG))
    return {"model": model, "config": config, "cache": root / "cache"}


def run_generate(inputs: dict[str, Path], sources: Path, out: Path, layout: str, n: int = 2) -> Path:
    argv = ["generate", "-n", str(n), "--labels-from", str(sources), "--edits", str(inputs["config"]),
            "--model", str(inputs["model"]), "--layout", layout, "-o", str(out), "--device", "cpu",
            "--precision", "fp32", "--seed", "7", "--quiet", "--cache", str(inputs["cache"])]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module", params=["brats2021", "brats2023"])
def generated(request, study_cases, generate_inputs, tmp_path_factory) -> list[Path]:
    """The case folders of a BraTS-layout dataset generated from a patient who is not in the study."""
    from MedSynthLib.generate.layouts import Layout

    out = run_generate(generate_inputs, study_cases["outside"].parent,
                       tmp_path_factory.mktemp(f"generated_{request.param}") / "out", request.param)
    folders = [out / Layout(request.param).case_id(i) for i in range(2)]
    assert all(folder.is_dir() and not (folder / "provenance.json").exists() for folder in folders)
    return folders


def test_a_generated_case_folder_opens_as_a_synthetic_case(generated):
    from MedSynthLib.evaluation.reader_study import is_synthetic_case
    from MedSynthLib.schema.review import read_provenance

    folder = generated[0]
    case = open_case(folder)
    assert is_synthetic_case(folder) and case.synthetic and set(case.files) == set(MODALITIES)
    assert all(path.parent == folder and path.name.startswith(folder.name) for path in case.files.values())
    np.testing.assert_array_equal(case.tumour, read_case(folder).tumour)
    assert case.tumour.any()
    assert read_provenance(folder)["case_id"] == folder.name  # the dataset's provenance/<case>.json


def test_a_study_takes_generated_cases_as_its_synthetic_ones(generated, study_cases):
    real = [study_cases["real0"], study_cases["real1"]]
    plan = plan_study(real, generated, seed=0)
    synthetic_items = {item["case"] for item in plan["items"] if item["truth"] == "synthetic"}
    assert synthetic_items == {str(folder.resolve()) for folder in generated}
    assert plan["paired"]["pairs"] == []  # made from a patient outside the study
    with pytest.raises(MedSynthError, match="given as real but it is a synthetic case"):
        plan_study([generated[0]], [study_cases["unrelated0"]])


def test_a_generated_case_of_a_study_patient_is_a_pair(study_cases, generate_inputs, tmp_path):
    from MedSynthLib.generate.layouts import Layout

    # Drawn from the study's own two patients: each case keeps one of their brains.
    out = run_generate(generate_inputs, study_cases["real0"].parent, tmp_path / "out", "brats2021")
    folders = [out / Layout("brats2021").case_id(i) for i in range(2)]
    with pytest.raises(MedSynthError, match="brain") as error:
        plan_study([study_cases["real0"], study_cases["real1"]], folders)
    message = str(error.value)
    assert any(str(folder.resolve()) in message for folder in folders)
    assert str(study_cases["real0"].resolve()) in message or str(study_cases["real1"].resolve()) in message


def test_a_generated_case_keeps_a_rating_in_the_datasets_provenance_and_takes_no_note(generated):
    folder = generated[1]
    record = folder.parent / "provenance" / f"{folder.name}.json"
    before = json.loads(record.read_text())
    review = save_review(folder, 4)
    after = json.loads(record.read_text())
    assert after["review"] == review and review["rating"] == 4
    assert {k: v for k, v in after.items() if k != "review"} == {k: v for k, v in before.items() if k != "review"}
    assert not (folder / "provenance.json").exists()
    # The dataset (its provenance/ included) is what is shared: a free-text note has no place in it.
    with pytest.raises(MedSynthError, match="note"):
        save_review(folder, 3, "looks like patient Smith")
    assert json.loads(record.read_text()) == after


def test_cli_review_serves_a_generated_case_and_a_study_of_them(generated, study_cases, tmp_path, capsys,
                                                                 monkeypatch):
    _needs_web()
    import MedSynthWeb.cli as web_cli
    from MedSynthWeb.cli import review_entries

    (entry,) = review_entries([generated[0]], [])
    assert entry.synthetic is not None and entry.synthetic.folder == generated[0].resolve()
    monkeypatch.setattr(web_cli, "_start", lambda app, args, what: None)
    assert cli.main(["review", *map(str, generated), "--port", str(_free_port())]) == 0, capsys.readouterr().err
    results = tmp_path / "results"
    assert cli.main(["review", "--study", str(study_cases["real0"]), "--synthetic", *map(str, generated),
                     "-o", str(results), "--port", str(_free_port())]) == 0, capsys.readouterr().err
    assert (results / "study_plan.json").is_file()


@pytest.fixture(scope="module")
def generated_datasets(study_cases, generate_inputs, tmp_path_factory) -> dict[str, Path]:
    """One case of each layout whose cases are files (nnU-Net, MSD) and of a BraTS layout, as whole outputs."""
    root = tmp_path_factory.mktemp("generated_layouts")
    return {layout: run_generate(generate_inputs, study_cases["outside"].parent, root / layout, layout, n=1)
            for layout in ("nnunet", "msd", "brats2021")}


@pytest.mark.parametrize("layout, where, says", [
    ("nnunet", ".", "brats2021"), ("nnunet", "Dataset501_BrainTumourSynth", "brats2021"),
    ("nnunet", "Dataset501_BrainTumourSynth/imagesTr", "brats2021"), ("msd", "Task501_BrainTumourSynth", "brats2021"),
    ("brats2021", ".", "BrainTumourSynth_00000"),
])
def test_a_generated_dataset_that_is_no_case_folder_is_one_clear_line(generated_datasets, study_cases, tmp_path,
                                                                      capsys, layout, where, says):
    _needs_web()
    given = generated_datasets[layout] / where
    assert cli.main(["review", str(given), "--port", str(_free_port())]) == 2
    err = _one_line(capsys)
    assert str(given.resolve()) in err or str(given) in err
    assert "medsynth generate" in err and says in err, err
    results = tmp_path / "results"
    assert cli.main(["review", "--study", str(study_cases["real0"]), "--synthetic", str(given), "-o",
                     str(results), "--port", str(_free_port())]) == 2
    err = _one_line(capsys)
    assert "medsynth generate" in err and says in err, err
    assert not results.exists()


# --- the review page -----------------------------------------------------------------------------------


def _review_app(folders: list[Path]):
    _needs_web()
    from MedSynthWeb.cli import review_entries
    from MedSynthWeb.review_app import ReviewApp

    return ReviewApp(review_entries(folders, []))


def test_the_note_field_is_off_with_a_reason_where_no_note_can_be_saved(generated_datasets, study_cases, tmp_path):
    (exported,) = export_cases([study_cases["unrelated0"]], tmp_path / "export", "nifti")
    generated = generated_datasets["brats2021"] / "BrainTumourSynth_00000"
    app = _review_app([study_cases["unrelated0"], exported, generated])
    names = [entry.synthetic.folder for entry in app.entries]
    assert names == [study_cases["unrelated0"].resolve(), exported.resolve(), generated.resolve()]
    assert app.state.can_rate and app.state.can_note and not app.state.note_off
    for index in (1, 2):
        app._on_case(index)
        assert app.state.can_rate and not app.state.can_note, index
        assert "note" in app.state.note_off and "shared" in app.state.note_off, app.state.note_off
        app.save(index, 2, "")
        assert app.state.status.startswith("saved"), app.state.status
    app._on_case(0)
    assert app.state.can_note and not app.state.note_off


# --- review shows a synthetic case under the real case it was made from -------------------------------


def test_review_pairs_a_synthetic_case_with_the_real_case_whose_brain_it_has(study_cases):
    _needs_web()
    from MedSynthWeb.cli import review_entries

    entries = review_entries([study_cases["from_real0"], study_cases["unrelated0"], study_cases["real0"],
                              study_cases["real1"]], [])
    by_synthetic = {e.synthetic.folder if e.synthetic else None: e for e in entries}
    paired = by_synthetic[study_cases["from_real0"].resolve()]
    assert paired.real is not None and paired.real.folder == study_cases["real0"].resolve()
    assert by_synthetic[study_cases["unrelated0"].resolve()].real is None  # another patient's brain: alone
    alone = [e for e in entries if e.synthetic is None]
    assert [e.real.folder for e in alone] == [study_cases["real1"].resolve()]  # real0 is shown with its case
    assert all(entry.real is None or entry.real.brain is None for entry in entries)  # masks not kept


def test_review_page_of_an_exported_case_offers_no_note_and_says_why(browser, study_cases, tmp_path):
    from test_web_review import PAGE_WAIT_MS, Server, _wait_for_images

    (exported,) = export_cases([study_cases["unrelated0"]], tmp_path / "export", "nifti")
    with Server([str(exported)], tmp_path / "review.log") as server:
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        try:
            page.goto(server.url, timeout=PAGE_WAIT_MS)
            _wait_for_images(page, 4)
            assert page.locator("#note").count() == 0  # a note could not be saved here: no field to type it in
            assert "No note" in page.inner_text("#note-off") and "shared" in page.inner_text("#note-off")
            page.click("#rating-2")
            page.click("#save-review")
            page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').startsWith('saved')",
                                   timeout=PAGE_WAIT_MS)
        finally:
            page.close()
    assert json.loads((exported / "provenance.json").read_text())["review"]["rating"] == 2


def test_review_compares_no_cases_on_other_grids(study_cases, tmp_path):
    _needs_web()
    from MedSynthWeb.cli import review_entries

    images, seg = phantom(shape=(40, 48, 40), seed=5)
    for modality, array in images.items():
        write_volume(array, tmp_path / "Small" / f"Small_{modality}.nii.gz")
    write_volume(seg, tmp_path / "Small" / "Small_seg.nii.gz")
    small = synthesise(derived(tmp_path / "Small"), tmp_path / "small_synthetic")
    entries = review_entries([small, study_cases["real0"]], [])
    assert [(e.synthetic is not None, e.real is not None) for e in entries] == [(True, False), (False, True)]
