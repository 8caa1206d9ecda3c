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


def moved_down_and_back(array: np.ndarray) -> np.ndarray:
    return np.roll(np.roll(array, 2, axis=0), -2, axis=1)


#: ... and every phantom's tumour is one sphere, which moved elsewhere is still that patient's tumour: another
#: patient's has another shape, an ellipsoid with these radii (k, j, i) in voxels (tumour Dice with the centres
#: aligned at most 0.67 between any two of them and the sphere, mirrored or not).
TUMOUR_RADII = {"real1": (9.0, 4.5, 6.0), "outside": (4.5, 6.0, 10.0), "outside2": (6.0, 10.0, 4.0)}


def reshaped_tumour(seg: np.ndarray, radii: tuple[float, float, float]) -> np.ndarray:
    """``seg`` with its tumour replaced by an ellipsoid of ``radii`` about the same centre, in the same brain."""
    brain_shape = seg.shape
    centre = np.argwhere(seg > 0).mean(axis=0)
    r = np.sqrt(sum(((axis - c) / radius) ** 2 for axis, c, radius in zip(np.indices(brain_shape), centre, radii)))
    out = np.zeros_like(seg)
    out[r < 1.0], out[r < 0.64], out[r < 0.36] = 2, 4, 1
    return out


def other_patient(root: Path, name: str, move=mirrored_front_to_back, seed: int = 40,
                  radii: tuple[float, float, float] = TUMOUR_RADII["outside"]) -> Path:
    """A phantom patient in BraTS 2021 naming whose brain and tumour are moved by ``move``, the tumour reshaped."""
    images, seg = phantom(seed=seed)
    seg = reshaped_tumour(seg, radii)
    images["t1ce"] = np.where(seg == 4, 1500, images["t1"]).astype(np.int16)
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


def mirrored_anatomy(labelmap: LabelMap) -> LabelMap:
    """The label map mirrored left-right on its grid (array axis 2 of the phantoms' LPS grid runs right to left)."""
    return labelmap.with_array(np.ascontiguousarray(labelmap.array[:, :, ::-1]),
                               {"name": "test_mirror", "params": {}, "schema_version": 1})


@pytest.fixture(scope="module")
def study_cases(tmp_path_factory) -> dict[str, Path]:
    from MedSynthLib.edits import Flip, InsertTumour

    root = tmp_path_factory.mktemp("pairs")
    real = [write_phantom_case(root / "real", 0),
            other_patient(root / "real", "Real_001", mirrored_left_to_right, radii=TUMOUR_RADII["real1"])]
    outside = other_patient(root / "outside", "Outside_001")  # a patient who is not in the study
    outside2 = other_patient(root / "outside2", "Outside_002", moved_down_and_back, seed=41,
                             radii=TUMOUR_RADII["outside2"])
    unrelated = derived(outside)
    own = derived(real[0])
    # The tumour of the study's first patient copied, in place, into another brain (insert_tumour).
    array = unrelated.array.copy()
    tumour = own.array >= Label.NCR
    array[array >= Label.NCR] = Label.WM
    array[tumour] = own.array[tumour]
    inserted = LabelMap(array, unrelated.grid, [*unrelated.history, {"name": "insert_tumour", "params": {
        "keep_existing": False}, "schema_version": 1}])
    # ... and moved elsewhere in that brain (medsynth tumour insert --centre), then mirrored left-right too.
    centre = np.argwhere(unrelated.array > 0).mean(axis=0)  # the brain's centre (k, j, i)
    elsewhere = unrelated.grid.index_to_lps(centre[::-1] + (-3.0, -4.0, 0.0))
    moved = InsertTumour(centre_ras_mm=tuple(float(v) for v in (-elsewhere[0], -elsewhere[1], elsewhere[2])),
                         source="real0")(unrelated, own)
    return {"real0": real[0], "real1": real[1], "outside": outside,
            "unrelated0": synthesise(unrelated, root / "synthetic" / "unrelated0", seed=1),
            "unrelated1": synthesise(unrelated, root / "synthetic" / "unrelated1", seed=2),
            "other_unrelated": synthesise(derived(outside2), root / "synthetic" / "other_unrelated", seed=5),
            "from_real0": synthesise(own, root / "synthetic" / "from_real0", seed=3),
            "mirror_of_real0": synthesise(mirrored_anatomy(own), root / "synthetic" / "mirror_of_real0", seed=6),
            "tumour_of_real0": synthesise(inserted, root / "synthetic" / "tumour_of_real0", seed=4),
            "moved_tumour_of_real0": synthesise(moved, root / "synthetic" / "moved_tumour_of_real0", seed=7),
            "moved_mirrored_tumour_of_real0": synthesise(Flip("LR")(moved), root / "synthetic" / "moved_mirrored",
                                                         seed=8)}


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
                      [study_cases["unrelated0"], study_cases["other_unrelated"]], seed=0)
    assert plan["paired"]["allowed"] is False
    assert plan["paired"]["pairs"] == [] and plan["paired"]["synthetic_pairs"] == []


@pytest.mark.parametrize("synthetic, shares", [
    ("from_real0", "brain"), ("tumour_of_real0", "tumour"),
    # The same patient mirrored left-right, or their tumour moved into another brain (and mirrored there).
    # (The phantom's tumour is a sphere, its own mirror image: the mirrored tumour's shape is found unmirrored;
    # test_a_tumour_moved_and_mirrored_is_found_but_not_another_shape mirrors an irregular one.)
    ("mirror_of_real0", "mirrored brain"), ("moved_tumour_of_real0", "tumour shape moved"),
    ("moved_mirrored_tumour_of_real0", "tumour shape moved"),
])
def test_a_synthetic_case_of_a_study_patient_is_refused_naming_both(study_cases, synthetic, shares):
    real = [study_cases["real0"], study_cases["real1"]]
    with pytest.raises(MedSynthError) as error:
        plan_study(real, [study_cases["other_unrelated"], study_cases[synthetic]], seed=0)
    message = str(error.value)
    assert "\n" not in message
    assert str(study_cases[synthetic]) in message and str(study_cases["real0"].resolve()) in message
    assert shares in message and "--allow-paired" in message
    assert str(study_cases["real1"].resolve()) not in message  # another patient: no pair
    assert "more such pair" not in message, message


def test_two_synthetic_cases_of_one_patient_are_refused_naming_both(study_cases):
    # Both made from one label map: the reader would meet that patient twice, though no real case is theirs.
    unrelated = [study_cases["unrelated0"], study_cases["unrelated1"]]
    with pytest.raises(MedSynthError) as error:
        plan_study([study_cases["real0"], study_cases["real1"]], [unrelated[0], study_cases["other_unrelated"],
                                                                  unrelated[1]], seed=0)
    message = str(error.value)
    assert "\n" not in message and "--allow-paired" in message and "brain" in message
    assert str(unrelated[0].resolve()) in message and str(unrelated[1].resolve()) in message
    assert str(study_cases["other_unrelated"].resolve()) not in message
    assert "real case" not in message


def test_allow_paired_records_two_synthetic_cases_of_one_patient(study_cases, tmp_path):
    real = [study_cases["real0"]]
    synthetic = [study_cases["unrelated0"], study_cases["unrelated1"]]
    results = tmp_path / "results"
    study = ReaderStudy.create_or_resume(results, real, synthetic, seed=0, allow_paired=True)
    plan = json.loads((results / "study_plan.json").read_text())
    assert plan["paired"]["pairs"] == []
    (pair,) = plan["paired"]["synthetic_pairs"]
    assert pair["synthetic"] == [str(folder.resolve()) for folder in synthetic]
    assert "brain" in pair["shares"] and pair["brain_dice"] == pytest.approx(1.0)
    for item in study.items:
        study.answer(item.item_id, "real", 1)
    study.close()
    paired = write_summary(results)["paired"]
    assert paired["synthetic_pairs"] == plan["paired"]["synthetic_pairs"]
    of_pairs = [i for i in plan["items"] if i["case"] in pair["synthetic"]]
    assert paired["items_of_paired_cases"]["n"] == len(of_pairs) > 0
    text = (results / "summary.md").read_text()
    assert study_cases["unrelated0"].name in text and study_cases["unrelated1"].name in text


def _case_on_grid(folder: Path, brain: np.ndarray, tumour: np.ndarray, direction) -> "CaseImages":
    """A case in memory whose T1 file gives it a grid with ``direction`` (what the mirror is taken along)."""
    from MedSynthLib.evaluation.reader_study import CaseImages

    t1 = write_volume(brain.astype(np.int16), folder / "t1.nii.gz", direction=direction)
    return CaseImages(folder, True, {"t1": t1}, None, tumour.astype(np.uint8) * Label.ED, brain)


def test_the_mirror_is_taken_along_the_grids_left_right_axis(tmp_path):
    from MedSynthLib.evaluation.reader_study import find_pairs, find_synthetic_pairs

    # A sagittal-first grid: array axis 0 (k) runs from right to left, axis 2 (i) from posterior to anterior.
    sagittal = (0, 0, 1, -1, 0, 0, 0, -1, 0)
    k, j, i = np.indices((30, 32, 34))
    brain = ((k - 13) / 11.0) ** 2 + ((j - 16) / 13.0) ** 2 + ((i - 15) / 12.0) ** 2 < 1  # off the grid's centre
    tumour = brain & (abs(k - 8) < 3) & (abs(j - 12) < 5) & (abs(i - 20) < 2)
    real = _case_on_grid(tmp_path / "real", brain, tumour, sagittal)
    left_right = _case_on_grid(tmp_path / "left_right", brain[::-1], tumour[::-1], sagittal)
    front_back = _case_on_grid(tmp_path / "front_back", brain[:, :, ::-1], np.zeros_like(tumour), sagittal)
    (pair,) = find_pairs([real], [left_right, front_back])
    assert pair["synthetic"] == str(left_right.folder.resolve()) and pair["mirrored"] == ["brain", "tumour"]
    assert pair["brain_dice"] == 1.0 and pair["tumour_dice"] == 1.0
    assert find_synthetic_pairs([left_right, front_back]) == []
    # On an axial LPS grid the same arrays' axis 2 is left-right: now the other one is the mirror image.
    lps = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    axial = [_case_on_grid(tmp_path / f"axial_{n}", case.brain, np.zeros_like(tumour), lps)
             for n, case in enumerate((real, left_right, front_back))]
    (pair,) = find_pairs(axial[:1], axial[1:])
    assert pair["synthetic"] == str(axial[2].folder.resolve()) and pair["shares"] == ["brain"]


def test_a_tumour_moved_and_mirrored_is_found_but_not_another_shape(tmp_path):
    from MedSynthLib.evaluation.reader_study import find_pairs

    lps = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    k, j, i = np.indices((40, 44, 48))
    brain = ((k - 20) / 18.0) ** 2 + ((j - 22) / 20.0) ** 2 + ((i - 24) / 22.0) ** 2 < 1
    other_brain = ((k - 19) / 17.0) ** 2 + ((j - 22) / 19.0) ** 2 + ((i - 23) / 21.0) ** 2 < 1
    # An irregular tumour: two overlapping boxes, so its mirror image is another shape in place.
    tumour = np.zeros(brain.shape, bool)
    tumour[14:22, 10:18, 30:36] = True
    tumour[18:24, 14:20, 34:40] = True
    moved = np.roll(tumour, (4, 12, -20), axis=(0, 1, 2))[:, :, ::-1]  # moved and mirrored left-right
    unlike = np.zeros(brain.shape, bool)  # about as many voxels in one box: another tumour
    unlike[10:18, 20:28, 5:14] = True
    real = _case_on_grid(tmp_path / "real", brain, tumour, lps)
    synthetic = [_case_on_grid(tmp_path / name, other_brain, mask, lps)
                 for name, mask in (("moved", moved), ("unlike", unlike))]
    (pair,) = find_pairs([real], synthetic)
    assert pair["synthetic"] == str(synthetic[0].folder.resolve())
    assert pair["shares"] == ["moved_tumour"] and pair["mirrored"] == ["moved_tumour"]
    assert pair["moved_tumour_dice"] == 1.0 and pair["tumour_dice"] is None


def _as_planned_before_the_check(results: Path, paired_record: bool) -> None:
    """Make the plan look as an earlier MedSynth wrote it without --allow-paired: no pairs found (and, before pairs
    were checked at all, no record of them)."""
    plan_path = results / "study_plan.json"
    plan = json.loads(plan_path.read_text())
    plan["inputs"]["allow_paired"] = False
    if paired_record:
        plan["paired"] = {"allowed": False, "pairs": []}
    else:
        del plan["paired"], plan["inputs"]["allow_paired"]
    plan_path.write_text(json.dumps(plan))


@pytest.mark.parametrize("synthetic, paired_record", [
    (("unrelated0", "unrelated1"), True), (("other_unrelated", "mirror_of_real0"), True),
    (("other_unrelated", "moved_tumour_of_real0"), False),
])
def test_a_plan_made_before_the_check_is_checked_on_resume(study_cases, tmp_path, synthetic, paired_record):
    real = [study_cases["real0"]]
    folders = [study_cases[name] for name in synthetic]
    results = tmp_path / "results"
    ReaderStudy.create_or_resume(results, real, folders, seed=0, allow_paired=True).close()
    _as_planned_before_the_check(results, paired_record)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in results.iterdir())
    with pytest.raises(MedSynthError) as error:
        ReaderStudy.create_or_resume(results, real, folders, seed=0)
    message = str(error.value)
    assert "\n" not in message and "--allow-paired" in message and str(folders[1].resolve()) in message
    assert str((real[0] if "real0" in synthetic[1] else folders[0]).resolve()) in message
    assert sorted((p.name, p.stat().st_mtime_ns) for p in results.iterdir()) == before  # nothing written
    # The lock was let go: the study opens again once the cases are fine (here: read-only, to summarise).
    assert ReaderStudy.open(results).plan["seed"] == 0


def test_a_plan_made_with_allow_paired_before_the_check_resumes(study_cases, tmp_path):
    real, synthetic = [study_cases["real0"]], [study_cases["unrelated0"], study_cases["unrelated1"]]
    results = tmp_path / "results"
    ReaderStudy.create_or_resume(results, real, synthetic, seed=0, allow_paired=True).close()
    plan = json.loads((results / "study_plan.json").read_text())
    plan["paired"] = {"allowed": True, "pairs": []}  # as an earlier MedSynth wrote it
    (results / "study_plan.json").write_text(json.dumps(plan))
    ReaderStudy.create_or_resume(results, real, synthetic, seed=0, allow_paired=True).close()


def test_a_plan_checked_when_made_is_not_read_again_on_resume(study_cases, tmp_path, monkeypatch):
    from MedSynthLib.evaluation import reader_study

    real, synthetic = [study_cases["real0"]], [study_cases["unrelated0"], study_cases["other_unrelated"]]
    results = tmp_path / "results"
    ReaderStudy.create_or_resume(results, real, synthetic, seed=0).close()
    opened = []
    monkeypatch.setattr(reader_study, "open_case", lambda *a, **k: opened.append(a) or open_case(*a, **k))
    ReaderStudy.create_or_resume(results, real, synthetic, seed=0).close()
    assert opened == []  # the plan records the check it passed: no case is read again
    _as_planned_before_the_check(results, True)
    ReaderStudy.create_or_resume(results, real, synthetic, seed=0).close()
    assert len(opened) == 3


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
    # Both drawn from the one patient outside the study: that patient's brain twice.
    with pytest.raises(MedSynthError, match="brain") as error:
        plan_study(real, generated, seed=0)
    assert all(str(folder.resolve()) in str(error.value) for folder in generated)
    plan = plan_study(real, generated, seed=0, allow_paired=True)
    synthetic_items = {item["case"] for item in plan["items"] if item["truth"] == "synthetic"}
    assert synthetic_items == {str(folder.resolve()) for folder in generated}
    assert plan["paired"]["pairs"] == []  # made from a patient outside the study
    assert [pair["synthetic"] for pair in plan["paired"]["synthetic_pairs"]] == [
        [str(folder.resolve()) for folder in generated]]
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
                     "-o", str(results), "--port", str(_free_port()), "--allow-paired"]) == 0, capsys.readouterr().err
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


# --- real cases ------------------------------------------------------------------------------------------


def test_real_patients_are_no_pairs_but_a_moved_mirrored_tumour_is(brats_cases, tmp_path):
    from MedSynthLib.evaluation.reader_study import CaseImages, find_pairs, find_synthetic_pairs

    # Three BraTS 2021 patients (the 351 pairs of the 27 test-data patients stay under the thresholds too: see
    # PAIRED_* in reader_study.py); each pair compared mirrored and with the tumours' centres aligned as well.
    cases = [open_case(folder, with_brain=True) for folder in brats_cases[:3]]
    assert find_synthetic_pairs(cases) == [] and find_pairs(cases[:1], cases[1:]) == []
    # The first patient's tumour moved into the second's brain and mirrored left-right there; and the second's
    # brain mirrored left-right (the BraTS grid's array axis 2).
    tumour = cases[0].tumour > 0
    box = np.argwhere(tumour)
    moved = np.zeros_like(tumour)
    shift = np.rint(np.argwhere(cases[1].brain).mean(axis=0) - box.mean(axis=0)).astype(int)
    moved[tuple((box + shift).T)] = True
    moved = moved[:, :, ::-1] & cases[1].brain
    synthetic = [CaseImages(tmp_path / "moved", True, cases[1].files, None, moved.astype(np.uint8) * Label.ED,
                            None),  # (its brain is the second patient's: compared in the other case)
                 CaseImages(tmp_path / "mirrored", True, cases[1].files, None, None, cases[1].brain[:, :, ::-1])]
    first, second = find_pairs(cases, synthetic)
    assert (first["real"], first["shares"], first["mirrored"]) == (str(brats_cases[0].resolve()), ["moved_tumour"],
                                                                   ["moved_tumour"])
    assert first["moved_tumour_dice"] >= 0.95
    assert (second["real"], second["shares"], second["mirrored"]) == (str(brats_cases[1].resolve()), ["brain"],
                                                                      ["brain"])
