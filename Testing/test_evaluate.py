"""`evaluate`: fidelity, the class-mean baselines, contrast rules and the checkerboard ratio per case."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import write_phantom_case
from MedSynthLib.cases.readers import MODALITIES, read_case
from MedSynthLib.evaluation.evaluate import evaluate
from MedSynthLib.schema.labels import Label
from MedSynthLib.synthesis.models import resolve_model
from MedSynthLib.synthesis.normalize import TISSUE_ZSCORE_SCALE, HealthyTissueZScore, fit_case_normalizers


def _labels_for(folder: Path) -> np.ndarray:
    """Phantom anatomy from its T1 shells (the test is about evaluate, not the anatomy model)."""
    case = read_case(folder)
    t1 = case.images["t1"]
    labels = np.select([t1 >= 800, t1 >= 500, t1 > 0], [Label.WM, Label.GM, Label.CSF], 0).astype(np.uint8)
    return np.where(case.tumour > 0, case.tumour, labels).astype(np.uint8)


class _Engine:
    """Returns the case's own images (a perfect model), them with a period-2 pattern added, or (``flat``) every
    class painted with the real image's median of it: the right class signal without the real texture."""

    def __init__(self, checker: float, flat: bool = False) -> None:
        # A model of the tissue z-score kind: its statistics do not matter here, only how a case is normalised.
        model_range = HealthyTissueZScore(0.0, 1.0, TISSUE_ZSCORE_SCALE, "tissue_zscore")
        self.model = SimpleNamespace(name="probe", sha256="0" * 64, modalities=tuple(MODALITIES),
                                     normalizers={m: model_range for m in MODALITIES})
        self.checker = checker
        self.flat = flat
        self.current: dict[str, np.ndarray] = {}
        self.own_kind = "tissue_zscore"

    def synthesize(self, labelmap):
        labels = labelmap.array
        k, j, i = np.indices(labels.shape)
        pattern = np.where((k + j + i) % 2 == 0, 1.0, -1.0) * self.checker
        images = {m: self.current[m] + pattern * (self.current[m] > 0) for m in MODALITIES}
        if self.flat:
            for m in MODALITIES:
                painted = np.zeros_like(images[m])
                for value in np.unique(labels[labels > 0]):
                    painted[labels == value] = np.median(self.current[m][labels == value])
                images[m] = painted
        # The network's output: the images in the case's own normalisation (a model returns them in its own range).
        own = fit_case_normalizers(self.current, labels, self.own_kind)
        normalized = np.stack([own[m].forward(images[m], labels > 0) for m in MODALITIES])
        return SimpleNamespace(images=images, normalized=normalized)


@pytest.mark.parametrize("checker", [0.0, 150.0])
def test_evaluate_reports_rules_and_checkerboard(tmp_path: Path, checker: float) -> None:
    folders = [write_phantom_case(tmp_path, seed) for seed in range(3)]
    engine = _Engine(checker)
    original = read_case

    def labels_for(folder: Path) -> np.ndarray:
        engine.current = {m: v.astype(np.float32) for m, v in original(folder).images.items()}
        return _labels_for(folder)

    report = evaluate(engine, folders[:1], labels_for, reference_dirs=folders[1:])
    case = report["cases"][0]
    assert case["case"] == folders[0].name
    # Real and synthetic agree rule by rule when the synthetic images are the real ones.
    if checker == 0:
        assert report["summary"]["model"]["brain_ssim"] == pytest.approx(1.0)
        assert all(r == 1.0 for r in report["checkerboard_ratio"].values())
        for rule in report["contrast_rules"].values():
            assert rule["synthetic_passed"] == rule["real_passed"]
    else:
        assert report["summary"]["model"]["brain_ssim"] < 0.9
        assert min(report["checkerboard_ratio"].values()) > 5.0
    assert {"checked", "synthetic_passed", "real_passed"} == set(next(iter(report["contrast_rules"].values())))
    assert "class_mean_training" in report["summary"]


def test_evaluate_reads_through_the_given_reader(tmp_path: Path) -> None:
    """A caller scoring several models passes a cached reader: every case is read through it, and the
    report is the same as with the default reader."""
    folders = [write_phantom_case(tmp_path, seed) for seed in range(3)]
    engine = _Engine(0.0)
    reads: list[str] = []

    def reader(folder: Path):
        reads.append(folder.name)
        return read_case(folder, require_segmentation=True)

    def labels_for(folder: Path) -> np.ndarray:
        engine.current = {m: v.astype(np.float32) for m, v in read_case(folder).images.items()}
        return _labels_for(folder)

    with_reader = evaluate(engine, folders[:1], labels_for, reference_dirs=folders[1:], reader=reader)
    assert sorted(reads) == sorted(f.name for f in folders)  # the held-out case and both reference cases
    default = evaluate(engine, folders[:1], labels_for, reference_dirs=folders[1:])
    assert with_reader["summary"] == default["summary"]


def test_evaluate_reports_progress_once_per_case_in_order(tmp_path: Path) -> None:
    folders = [write_phantom_case(tmp_path, seed) for seed in range(2)]
    engine = _Engine(0.0)
    steps: list[str] = []

    def labels_for(folder: Path) -> np.ndarray:
        engine.current = {m: v.astype(np.float32) for m, v in read_case(folder).images.items()}
        return _labels_for(folder)

    report = evaluate(engine, folders, labels_for, progress=steps.append)
    assert steps == [f.name for f in folders] == [c["case"] for c in report["cases"]]


def _scorer(engine: _Engine):
    """The ``labels_for`` of a phantom case that also hands ``engine`` the case's own images to return."""
    def labels_for(folder: Path) -> np.ndarray:
        engine.current = {m: v.astype(np.float32) for m, v in read_case(folder).images.items()}
        return _labels_for(folder)
    return labels_for


def test_evaluate_shares_the_model_free_baselines_between_models(tmp_path: Path) -> None:
    """Scoring a second model on the same cases reuses the class means and every case's baseline scores
    (they do not depend on the model): the reference cases are not read again, and the report is the one
    an unshared call gives."""
    folders = [write_phantom_case(tmp_path, seed) for seed in range(3)]
    reads: list[str] = []

    def reader(folder: Path):
        reads.append(folder.name)
        return read_case(folder, require_segmentation=True)

    shared: dict = {}
    first, second = _Engine(0.0), _Engine(150.0)
    evaluate(first, folders[:1], _scorer(first), reference_dirs=folders[1:], reader=reader, shared=shared)
    reads.clear()
    with_shared = evaluate(second, folders[:1], _scorer(second), reference_dirs=folders[1:], reader=reader,
                           shared=shared)
    assert reads == [folders[0].name]  # only the held-out case; the class means were kept
    alone = evaluate(second, folders[:1], _scorer(second), reference_dirs=folders[1:])
    assert with_shared == alone
    assert with_shared["summary"]["model"]["brain_ssim"] < 0.9  # the second model's own score, not the first's

    with pytest.raises(ValueError, match="reference cases"):
        evaluate(second, folders[:1], _scorer(second), reference_dirs=folders[2:], shared=shared)


def test_evaluate_measures_the_real_period2_power_once_per_case_when_shared(tmp_path: Path, monkeypatch) -> None:
    """The checkerboard ratio's reference, the real image's period-2 power, does not depend on the model: with
    ``shared`` a second model costs only its own four measurements per case, and the ratios are unchanged."""
    from MedSynthLib.evaluation import evaluate as evaluate_module
    from MedSynthLib.evaluation import image_checks

    folders = [write_phantom_case(tmp_path, seed) for seed in range(2)]
    measured = []
    real_power = image_checks.nyquist_power

    def counting(image, mask, sigma=2.0):
        measured.append(image)
        return real_power(image, mask, sigma)

    monkeypatch.setattr(image_checks, "nyquist_power", counting)
    monkeypatch.setattr(evaluate_module, "nyquist_power", counting)

    shared: dict = {}
    first, second = _Engine(0.0), _Engine(150.0)
    evaluate(first, folders, _scorer(first), shared=shared)
    measured.clear()
    with_shared = evaluate(second, folders, _scorer(second), shared=shared)
    assert len(measured) == len(folders) * 4  # the synthetic images only
    alone = evaluate(second, folders, _scorer(second))
    assert with_shared["checkerboard_ratio"] == alone["checkerboard_ratio"]


def test_class_signal_tells_a_flat_painting_at_the_real_levels_from_a_wrong_signal(tmp_path: Path) -> None:
    """A synthetic image with every class at the real median but none of the real texture has a smaller spread, so
    its own z-score moves every class away from the brain's mean: read that way it looks wrong. In the patient's
    frame its class medians are the real ones. A perfect model is right in both frames."""
    folder = write_phantom_case(tmp_path, 0)
    rng = np.random.default_rng(0)
    case = read_case(folder, require_segmentation=True)
    for m in MODALITIES:  # texture within the classes, as real scans have (the phantom's classes are nearly flat)
        inside = case.images[m] > 0
        case.images[m] = np.where(inside, case.images[m] + rng.normal(0.0, 150.0, inside.shape), 0.0).astype(np.float32)
        case.images[m][inside] = np.maximum(case.images[m][inside], 1.0)

    def scorer(engine: _Engine):
        def labels_for(path: Path) -> np.ndarray:
            engine.current = dict(case.images)
            return _labels_for(folder)
        return labels_for

    flat, perfect = _Engine(0.0, flat=True), _Engine(0.0)
    flat_report = evaluate(flat, [folder], scorer(flat), reader=lambda path: case)
    perfect_report = evaluate(perfect, [folder], scorer(perfect), reader=lambda path: case)
    for m in MODALITIES:
        flat_signal, perfect_signal = flat_report["class_signal"][m], perfect_report["class_signal"][m]
        assert set(flat_signal["classes"]) >= {"CSF", "GM", "WM"}
        for name, row in flat_signal["classes"].items():
            assert row["cases"] == 1
            assert row["patient_frame_minus_real"] == pytest.approx(0.0, abs=1e-3), (m, name)
        assert max(abs(row["synthetic_minus_real"]) for row in flat_signal["classes"].values()) > 0.05, m
        assert flat_signal["brain_spread_ratio"] < 0.95
        for row in perfect_signal["classes"].values():
            assert row["synthetic_minus_real"] == pytest.approx(0.0, abs=1e-4)
            assert row["patient_frame_minus_real"] == pytest.approx(0.0, abs=1e-3)
        assert perfect_signal["brain_spread_ratio"] == pytest.approx(1.0, abs=1e-3)
    row = flat_report["cases"][0]["class_signal"]["t1"]["classes"]["WM"]
    assert set(row) == {"real", "synthetic", "synthetic_in_patient_frame"}


@pytest.mark.parametrize("intensity", [{"low": 0.0, "high": 1000.0},
                                       {"kind": "tissue_zscore", "mean": 600.0, "std": 150.0, "scale": 15.0}],
                         ids=["percentile", "tissue_zscore"])
def test_medsynth_evaluate_reports_the_class_signal_of_a_real_model(tmp_path: Path, capsys, intensity) -> None:
    """The command end to end with a real (tiny, untrained) generator of either normalisation kind: the report
    carries both frames for every contrast and class, and the command prints where the signal is furthest off."""
    import json

    import torch

    from MedSynthLib.cli import main
    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator
    from test_synthesis_seed import PLAIN

    torch.manual_seed(3)
    state = {k: v.detach().contiguous() for k, v in Generator(PLAIN, backend="torch").state_dict().items()}
    model = write_model(tmp_path / "tiny", state, {"name": "tiny", "network": PLAIN.to_json(),
                                                   "intensity": {m: intensity for m in MODALITY_ORDER}})
    folder = write_phantom_case(tmp_path / "cases", 0)
    report_path = tmp_path / "report.json"
    assert main(["evaluate", str(folder), "--model", str(model), "--device", "cpu", "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["inference"] == {"device": "cpu", "precision": report["inference"]["precision"],
                                   "mirror_average": True}
    assert set(report["class_signal"]) == set(MODALITIES)
    for m in MODALITIES:
        signal = report["cases"][0]["class_signal"][m]
        assert signal["brain_spread_ratio"] > 0.0
        assert {"CSF", "GM", "WM"} <= set(signal["classes"])
        for row in signal["classes"].values():
            assert all(isinstance(row[key], float) for key in ("real", "synthetic", "synthetic_in_patient_frame"))
        assert set(report["class_signal"][m]["classes"]) == set(signal["classes"])
    assert "class signal in the patient's frame" in capsys.readouterr().out


def test_class_signal_without_grey_or_white_matter_leaves_the_patient_frame_undefined(tmp_path: Path) -> None:
    """The tissue z-score places a case in the patient's frame by its grey and white matter. A label map without
    them (here the whole brain called CSF) has no such frame: that case's class signal says so and carries no
    patient-frame medians, and the rest of its evaluation is reported as for any case."""
    folder = write_phantom_case(tmp_path, 0)
    case = read_case(folder, require_segmentation=True)
    engine = _Engine(0.0)
    engine.current = dict(case.images)

    def csf_only(path: Path) -> np.ndarray:
        labels = _labels_for(folder)
        return np.where((labels >= Label.CSF) & (labels <= Label.WM), Label.CSF, labels).astype(np.uint8)

    engine.own_kind = "healthy_zscore"  # the engine's own output needs a frame of its own: CSF is its reference
    report = evaluate(engine, [folder], csf_only, reader=lambda path: case)
    entry = report["cases"][0]
    for m in MODALITIES:
        signal = entry["class_signal"][m]
        assert signal["brain_spread_ratio"] is None
        assert "grey or white matter" in signal["patient_frame"]
        assert signal["classes"]["CSF"]["synthetic"] == pytest.approx(signal["classes"]["CSF"]["real"], abs=1e-4)
        assert all(row["synthetic_in_patient_frame"] is None for row in signal["classes"].values())
        assert report["class_signal"][m] == {"brain_spread_ratio": None, "classes": {}}
        assert entry["model"][m]["brain"]["ssim"] == pytest.approx(1.0)


def test_medsynth_evaluate_scores_at_the_appearance_spread_asked_and_records_it(tmp_path: Path, capsys) -> None:
    """A model with an appearance code is scored with seed 0 at ``--appearance-spread`` (0: the mean appearance),
    recorded in the report; a spread out of range is one line, exit 2, nothing written."""
    import json

    from MedSynthLib.cli import main
    from test_synthesis_seed import STYLED, _model

    model = _model(tmp_path / "styled", STYLED)
    folder = write_phantom_case(tmp_path / "cases", 0)
    reports = {}
    for spread in ("0", "1"):
        path = tmp_path / f"report_{spread}.json"
        assert main(["evaluate", str(folder), "--model", str(model), "--device", "cpu", "--appearance-spread", spread,
                     "-o", str(path)]) == 0
        reports[spread] = json.loads(path.read_text())
        assert reports[spread]["inference"]["appearance_spread"] == float(spread)
    scores = [reports[s]["cases"][0]["model"]["t1"]["brain"]["ssim"] for s in ("0", "1")]
    assert scores[0] != scores[1]  # another appearance, another score
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    for spread, line in (("2.5", "medsynth: error: --appearance-spread must be a number from 0 to 2, got 2.5"),
                         ("1.5", f"medsynth: error: --appearance-spread 1.5 is wider than model "
                                 f"{resolve_model(model).name} accepts (up to 1: ")):
        assert main(["evaluate", str(folder), "--model", str(model), "--device", "cpu", "--appearance-spread", spread,
                     "-o", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(line), err
        assert not bad.exists()


def test_medsynth_evaluate_says_which_cases_the_model_was_trained_on(tmp_path: Path, capsys) -> None:
    """``evaluate`` scores held-out cases; a case the model trained on (its training record keeps each case's content
    hash) scores in-sample.  That went unsaid: now the command says so before the run, in one line naming the cases,
    and the report marks each case."""
    import json

    import torch

    from MedSynthLib.cli import main
    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator
    from MedSynthLib.training.data import case_key
    from test_synthesis_seed import PLAIN

    seen, unseen = write_phantom_case(tmp_path / "cases", 0), write_phantom_case(tmp_path / "cases", 1)
    torch.manual_seed(3)
    state = {k: v.detach().contiguous() for k, v in Generator(PLAIN, backend="torch").state_dict().items()}
    intensity = {"low": 0.0, "high": 1000.0}
    config = {"name": "tiny", "network": PLAIN.to_json(), "intensity": {m: intensity for m in MODALITY_ORDER},
              "training": {"data": {"cases": 1, "case_sha256": [case_key(seen)]}}}
    model = write_model(tmp_path / "tiny", state, config)
    report_path = tmp_path / "report.json"
    capsys.readouterr()
    assert main(["evaluate", str(unseen), str(seen), "--model", str(model), "--device", "cpu",
                 "-o", str(report_path)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "in-sample" in line]
    assert len(said) == 1 and seen.name in said[0] and unseen.name not in said[0]
    report = json.loads(report_path.read_text())
    assert [case["in_model_training"] for case in report["cases"]] == [False, True]
    assert report["training_cases_scored"] == [seen.name]


def test_medsynth_evaluate_refuses_a_report_name_that_is_not_json_before_any_work(tmp_path: Path, capsys) -> None:
    """The report is JSON: ``-o report.png`` is refused at once in one line, nothing written (it ran the whole
    evaluation first)."""
    from MedSynthLib.cli import main

    folder = write_phantom_case(tmp_path / "cases", 0)
    capsys.readouterr()
    assert main(["evaluate", str(folder), "--model", "no-such-model", "-o", str(tmp_path / "report.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "report.png" in err and ".json" in err, err
    assert not (tmp_path / "report.png").exists()


def _key_written_before_cache_version_2(folder: Path) -> str:
    """A case's content hash as training recorded it before the prepared-case cache version became 2 (the
    scheme of medsynth-spade27-cpu's and medsynth-inpaint-brats27's records): "cache1" folded in, else the same."""
    import hashlib
    import json

    from MedSynthLib.cases.anatomy import DEFAULT_ANATOMY_MODEL
    from MedSynthLib.schema.labels import SCHEMA_VERSION

    case = read_case(folder, require_segmentation=True)
    digest = hashlib.sha256(f"cache1-schema{SCHEMA_VERSION}".encode())
    digest.update(json.dumps(DEFAULT_ANATOMY_MODEL.to_json(), sort_keys=True).encode())
    for name in sorted(case.files):
        digest.update(Path(case.files[name]).read_bytes())
    return digest.hexdigest()


def test_a_case_recorded_under_the_older_key_scheme_is_told_in_sample(tmp_path: Path) -> None:
    """The shipped medsynth-spade27-cpu records its training cases' hashes as computed before the cache version
    became 2: BraTS2021_00000, one of them, was scored as held-out without a word.  A record under either scheme
    tells the case; a case not in the record is told held-out under both."""
    from MedSynthLib.cases.case_key import case_files_hash
    from MedSynthLib.evaluation.evaluate import trained_on

    seen, unseen = write_phantom_case(tmp_path / "cases", 0), write_phantom_case(tmp_path / "cases", 1)
    old = _key_written_before_cache_version_2(seen)
    seen_case, unseen_case = read_case(seen, require_segmentation=True), read_case(unseen, require_segmentation=True)
    assert old != case_files_hash(seen_case)
    for recorded in ([old], [case_files_hash(seen_case)]):
        model = SimpleNamespace(config={"training": {"data": {"case_sha256": recorded}}})
        assert trained_on(model, seen_case) and not trained_on(model, unseen_case)
    assert not trained_on(SimpleNamespace(config={"training": {"data": {"case_sha256": []}}}), seen_case)


# --- inputs and output of `medsynth evaluate` -----------------------------------------------------------------------


def _tiny_model(folder: Path) -> Path:
    """A tiny untrained generator: the command's refusals come before it runs, its scores do not matter here."""
    import torch

    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator
    from test_synthesis_seed import PLAIN

    torch.manual_seed(3)
    state = {k: v.detach().contiguous() for k, v in Generator(PLAIN, backend="torch").state_dict().items()}
    return write_model(folder, state, {"name": "tiny", "network": PLAIN.to_json(),
                                       "intensity": {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}})


def _snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under ``folders`` with its content hash (folders: empty), links followed."""
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for folder in folders for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("where", ["held-out case", "reference case", "sub-folder of a case", "through a link"])
def test_medsynth_evaluate_refuses_a_report_inside_a_case_folder(tmp_path: Path, capsys, where: str) -> None:
    """``evaluate CASE -o CASE/ev.json`` wrote its report among the patient's scans (exit 0), where ``prepare`` and
    ``export`` refuse to write.  A report inside a held-out or reference case folder (links and sub-folders
    resolved) is refused in one line naming it, exit 2, before any work, and nothing is written."""
    from MedSynthLib.cli import main

    held_out, reference = write_phantom_case(tmp_path / "cases", 0), write_phantom_case(tmp_path / "cases", 1)
    (tmp_path / "link").symlink_to(held_out)
    output = {"held-out case": held_out / "ev.json", "reference case": reference / "ev.json",
              "sub-folder of a case": held_out / "reports" / "ev.json",
              "through a link": tmp_path / "link" / "ev.json"}[where]
    model = _tiny_model(tmp_path / "tiny")
    before = _snapshot(held_out, reference)
    capsys.readouterr()
    rc = main(["evaluate", str(held_out), "--reference", str(reference), "--model", str(model), "--device", "cpu",
               "-o", str(output)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"medsynth: error: {output}: lies inside the case folder"), err
    assert "outside the patients' case folders" in err[0]
    assert not output.exists() and _snapshot(held_out, reference) == before


@pytest.mark.parametrize("how", ["the same folder", "a copy", "a link"])
def test_medsynth_evaluate_refuses_a_held_out_case_that_is_also_a_reference(tmp_path: Path, capsys, how: str) -> None:
    """A held-out case also given in ``--reference`` had its class-mean 'training' baseline fitted on itself: the
    oracle, reported under the training baseline's name without a word.  It is refused in one line naming both,
    exit 2, nothing written; a copy or a link of the case (the same files) is the same case."""
    import shutil

    from MedSynthLib.cli import main

    held_out, other = write_phantom_case(tmp_path / "cases", 0), write_phantom_case(tmp_path / "cases", 1)
    if how == "the same folder":
        again = held_out
    elif how == "a copy":
        again = tmp_path / "copies" / held_out.name
        shutil.copytree(held_out, again)
    else:
        again = tmp_path / "linked"
        again.symlink_to(held_out)
    model = _tiny_model(tmp_path / "tiny")
    output = tmp_path / "report.json"
    capsys.readouterr()
    rc = main(["evaluate", str(held_out), "--reference", str(other), str(again), "--model", str(model),
               "--device", "cpu", "-o", str(output)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"medsynth: error: {again}: ") and str(held_out) in err[0], err
    assert "held-out" in err[0] and "reference" in err[0]
    assert not output.exists()


@pytest.mark.parametrize("how", ["the same folder", "a copy"])
def test_medsynth_evaluate_refuses_a_case_given_twice(tmp_path: Path, capsys, how: str) -> None:
    """The same case given twice was scored twice and weighed double in every mean of the report.  It is refused in
    one line naming both, exit 2, nothing written (a copy of its files is the same case); so is a reference case
    given twice, which weighed double in the class means."""
    import shutil

    from MedSynthLib.cli import main

    first, other = write_phantom_case(tmp_path / "cases", 0), write_phantom_case(tmp_path / "cases", 1)
    again = first
    if how == "a copy":
        again = tmp_path / "copies" / first.name
        shutil.copytree(first, again)
    model = _tiny_model(tmp_path / "tiny")
    output = tmp_path / "report.json"
    for argv in ([str(first), str(again)], [str(other), "--reference", str(first), str(again)]):
        capsys.readouterr()
        rc = main(["evaluate", *argv, "--model", str(model), "--device", "cpu", "-o", str(output)])
        captured = capsys.readouterr()
        assert rc == 2 and captured.out == ""
        err = captured.err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"medsynth: error: {again}: ") and str(first) in err[0], err
        assert "twice" in err[0]
        assert not output.exists()
