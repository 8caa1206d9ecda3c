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


def _labels_for(folder: Path) -> np.ndarray:
    """Phantom anatomy from its T1 shells (the test is about evaluate, not the anatomy model)."""
    case = read_case(folder)
    t1 = case.images["t1"]
    labels = np.select([t1 >= 800, t1 >= 500, t1 > 0], [Label.WM, Label.GM, Label.CSF], 0).astype(np.uint8)
    return np.where(case.tumour > 0, case.tumour, labels).astype(np.uint8)


class _Engine:
    """Returns the case's own images (a perfect model) or them with a period-2 pattern added."""

    def __init__(self, checker: float) -> None:
        self.model = SimpleNamespace(name="probe", sha256="0" * 64)
        self.checker = checker
        self.current: dict[str, np.ndarray] = {}

    def synthesize(self, labelmap):
        k, j, i = np.indices(labelmap.array.shape)
        pattern = np.where((k + j + i) % 2 == 0, 1.0, -1.0) * self.checker
        return SimpleNamespace(images={m: self.current[m] + pattern * (self.current[m] > 0) for m in MODALITIES})


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
