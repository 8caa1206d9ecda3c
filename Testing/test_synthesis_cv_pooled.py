"""benchmarks/synthesis_cv_pooled.py: per-fold held-out reports pooled into one cross-validated table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from MedSynthLib.schema.labels import MODALITIES
from conftest import load_benchmark

pooled = load_benchmark("synthesis_cv_pooled")

RULE = {"checked": 1, "synthetic_passed": 1, "real_passed": 0}


def _scores(ssim: float, psnr: float) -> dict:
    return {m: {"brain": {"ssim": ssim, "psnr": psnr}, "tumour": {"ssim": ssim / 2}} for m in MODALITIES}


def _report(tmp_path: Path, fold: int, label: str, cases: dict[str, float]) -> Path:
    entries = [{"case": name, "model": _scores(s, 20 + s), "class_mean_training": _scores(0.1, 15.0),
                "class_mean_oracle": _scores(0.2, 16.0), "checkerboard_ratio": {m: s for m in MODALITIES}}
               for name, s in cases.items()]
    report = {"fold": fold, "models": {label: {"cases": entries,
                                                "contrast_rules": {"T1: GM < WM": dict(RULE, checked=len(cases),
                                                                                       synthetic_passed=len(cases))}}}}
    path = tmp_path / f"fold{fold}.json"
    path.write_text(json.dumps(report))
    return path


def test_pooling_averages_over_cases_not_folds(tmp_path: Path) -> None:
    a = _report(tmp_path, 0, "m0", {"case1": 0.2, "case2": 0.4})
    b = _report(tmp_path, 1, "m1", {"case3": 0.9})
    result = pooled.pool([(a, "m0"), (b, "m1")])
    assert result["pooled"]["model"]["brain_ssim"] == pytest.approx(0.5)  # (0.2 + 0.4 + 0.9) / 3, not 0.6
    assert result["pooled"]["model"]["tumour_ssim"] == pytest.approx(0.25)
    assert result["pooled"]["class_mean_training"]["brain_psnr"] == pytest.approx(15.0)
    assert [f["model"]["brain_ssim"] for f in result["folds"]] == pytest.approx([0.3, 0.9])
    assert result["contrast_rules"]["T1: GM < WM"] == {"checked": 3, "synthetic_passed": 3, "real_passed": 0}
    assert result["checkerboard_median"]["t1"] == pytest.approx(0.4)
    assert "| all | 3 | 0 | 3 |" in pooled.markdown("m", result, "cmd")


def test_a_case_held_out_twice_or_a_missing_label_is_refused(tmp_path: Path) -> None:
    a = _report(tmp_path, 0, "m0", {"case1": 0.2})
    b = _report(tmp_path, 1, "m1", {"case1": 0.3})
    with pytest.raises(SystemExit, match="held out in two folds"):
        pooled.pool([(a, "m0"), (b, "m1")])
    with pytest.raises(SystemExit, match="no model 'other'"):
        pooled.pool([(a, "other")])


def test_a_recipe_is_compared_with_another_case_by_case(tmp_path: Path) -> None:
    """Two pooled recipes on the same held-out cases: per metric the paired difference, wins and losses and
    the exact sign-flip p; cases that are not the same in both are refused."""
    names = [f"case{i}" for i in range(6)]
    for folder in "abc":
        (tmp_path / folder).mkdir()
    ours = pooled.pool([(_report(tmp_path / "a", 0, "a", {n: 0.30 + 0.01 * i for i, n in enumerate(names)}), "a")])
    theirs = pooled.pool([(_report(tmp_path / "b", 0, "b", {n: 0.30 for n in names}), "b")])
    result = pooled.compare(ours, theirs)
    ssim = result["brain_ssim"]
    assert ssim["n"] == 6 and ssim["wins"] == 5 and ssim["losses"] == 0  # case0 ties
    assert ssim["mean_difference"] == pytest.approx(0.025)
    # As extreme as observed: the five non-zero differences all of one sign (2 ways, times 2 for the tie's sign).
    assert ssim["p"] == pytest.approx(4 / 64)
    assert "5 better, 0 worse" in pooled.comparison_markdown("ours", "theirs", result)
    # Each contrast's brain SSIM is compared too, by the same exact test.
    assert set(result) == {"brain_ssim", "brain_psnr", "tumour_ssim", *(f"{m}_ssim" for m in MODALITIES)}
    assert result["t1ce_ssim"]["mean_difference"] == pytest.approx(0.025)
    assert result["t1ce_ssim"]["p"] == pytest.approx(4 / 64) and result["t1ce_ssim"]["p_exact"]
    assert "| brain SSIM, T1ce | +0.025 |" in pooled.comparison_markdown("ours", "theirs", result)
    other_cases = pooled.pool([(_report(tmp_path / "c", 0, "c", {"case0": 0.3, "case9": 0.3}), "c")])
    with pytest.raises(SystemExit, match="not scored on the same held-out cases"):
        pooled.compare(ours, other_cases)


def test_the_class_signal_is_pooled_over_cases_when_the_reports_have_it(tmp_path: Path) -> None:
    def signalled(own: float, framed: float) -> dict:
        row = {"real": 1.0, "synthetic": 1.0 + own, "synthetic_in_patient_frame": 1.0 + framed}
        return {m: {"brain_spread_ratio": 0.5, "classes": {"ED": row}} for m in MODALITIES}

    a = _report(tmp_path, 0, "m0", {"case1": 0.2, "case2": 0.4})
    b = _report(tmp_path, 1, "m1", {"case3": 0.9})
    assert "class_signal" not in pooled.pool([(a, "m0"), (b, "m1")])  # reports from before the class signal
    for path, label, values in ((a, "m0", [(1.0, 0.1), (0.8, -0.3)]), (b, "m1", [(0.6, 0.2)])):
        report = json.loads(path.read_text())
        for entry, (own, framed) in zip(report["models"][label]["cases"], values):
            entry["class_signal"] = signalled(own, framed)
        path.write_text(json.dumps(report))
    result = pooled.pool([(a, "m0"), (b, "m1")])
    ed = result["class_signal"]["flair"]["classes"]["ED"]
    assert result["class_signal"]["cases"] == 3 and ed["cases"] == 3
    assert ed["synthetic_minus_real"] == pytest.approx(0.8)  # (1.0 + 0.8 + 0.6) / 3
    assert ed["patient_frame_minus_real"] == pytest.approx(0.0)
    assert ed["patient_frame_abs_difference"] == pytest.approx(0.2)
    assert "| flair | ED | 3 | +1.00 | +0.80 | +0.00 | 0.20 |" in pooled.markdown("m", result, "cmd")
