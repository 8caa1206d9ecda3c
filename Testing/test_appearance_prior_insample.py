"""benchmarks/appearance_prior_insample.py: the summary of prior-drawn against standard-normal codes, case by case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "appearance_prior_insample.py"
insample = load_benchmark("appearance_prior_insample")

MODALITIES = ["t1", "t1ce", "t2", "flair"]


def _row(brain_ssim: float, tumour_ssim: float) -> dict:
    return {"brain_ssim": brain_ssim, "brain_psnr": 20 + brain_ssim, "tumour_ssim": tumour_ssim,
            "brain_ssim_per_contrast": {m: brain_ssim for m in MODALITIES}}


def _per_case() -> dict:
    """Six cases, two seeds: the prior better by 0.01 x i on case i (case 0 ties), the tumour unchanged."""
    return {f"case{i}": {**{f"standard_normal_seed{s}": _row(0.3, 0.2) for s in (0, 1)},
                         **{f"prior_seed{s}": _row(0.3 + 0.01 * i, 0.2) for s in (0, 1)}} for i in range(6)}


def test_the_summary_pairs_cases_and_uses_the_exact_sign_flip_test() -> None:
    summary = insample.summarise(_per_case(), [0, 1])
    brain = summary["brain_ssim_seed_mean"]
    assert brain["difference"] == pytest.approx(0.025) and brain["prior_better"] == 5 and brain["cases"] == 6
    # As extreme as observed: the five non-zero differences all of one sign (2 ways, times 2 for the tie's sign).
    assert brain["sign_flip_p"] == pytest.approx(4 / 64) and brain["sign_flip_exact"]
    assert summary["brain_ssim_t1ce_seed_mean"]["difference"] == pytest.approx(0.025)
    assert summary["tumour_ssim_seed_1"]["difference"] == 0 and summary["tumour_ssim_seed_1"]["sign_flip_p"] == 1


def test_a_report_is_summarised_again_without_the_network(tmp_path: Path) -> None:
    report = {"command": "python benchmarks/appearance_prior_insample.py ...", "seeds": [0, 1],
              "summary": {"stale": {}}, "per_case": _per_case()}
    source, output = tmp_path / "report.json", tmp_path / "again.json"
    source.write_text(json.dumps(report))
    subprocess.run([sys.executable, str(SCRIPT), "--summarise", str(source), "-o", str(output)], check=True)
    again = json.loads(output.read_text())
    assert "stale" not in again["summary"] and again["per_case"] == report["per_case"]
    assert again["summary"]["brain_ssim_seed_mean"]["sign_flip_p"] == pytest.approx(4 / 64)
    assert again["command"] == report["command"] and "--summarise" in again["summary_command"]
