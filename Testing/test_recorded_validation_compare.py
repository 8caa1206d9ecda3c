"""benchmarks/recorded_validation_compare.py: two recipes' fold models paired by held-out case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark

compare_module = load_benchmark("recorded_validation_compare")


def _model(folder: Path, brain_ssims: list[float], tumour: bool = True) -> Path:
    per_case = []
    for value in brain_ssims:
        case = {}
        for index, m in enumerate(("t1", "t1ce", "t2", "flair")):
            entry = {"brain": {"ssim": value + 0.01 * index, "psnr": 20.0 + value}}
            if tumour:
                entry["tumour"] = {"ssim": value / 2}
            case[m] = entry
        per_case.append(case)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"validation": {"per_case": per_case}}))
    return folder


def test_cases_are_paired_across_folds_and_compared_per_quantity(tmp_path: Path) -> None:
    recipe = [_model(tmp_path / "new0", [0.32, 0.30]), _model(tmp_path / "new1", [0.25])]
    reference = [_model(tmp_path / "old0", [0.30, 0.31]), _model(tmp_path / "old1", [0.20])]
    result = compare_module.compare(recipe, reference)
    assert result["cases"] == 3
    brain = result["quantities"]["brain_ssim"]
    assert brain["recipe"] == pytest.approx((0.32 + 0.30 + 0.25) / 3 + 0.015)
    assert brain["mean_difference"] == pytest.approx((0.02 - 0.01 + 0.05) / 3)
    assert (brain["wins"], brain["losses"], brain["n"]) == (2, 1, 3)
    assert result["quantities"]["t1ce_ssim"]["reference"] == pytest.approx((0.30 + 0.31 + 0.20) / 3 + 0.01)
    assert result["quantities"]["tumour_ssim"]["mean_difference"] == pytest.approx((0.01 - 0.005 + 0.025) / 3)
    assert result["quantities"]["brain_psnr"]["mean_difference"] == pytest.approx((0.02 - 0.01 + 0.05) / 3)
    assert compare_module.lines(result)[0] == "3 held-out cases, recipe minus reference"


def test_mismatched_folds_or_a_model_without_validation_are_refused(tmp_path: Path) -> None:
    one = _model(tmp_path / "a", [0.3])
    two = _model(tmp_path / "b", [0.3, 0.2])
    with pytest.raises(SystemExit, match="one reference fold model for each"):
        compare_module.compare([one], [one, two])
    with pytest.raises(SystemExit, match="different numbers of held-out cases"):
        compare_module.compare([one], [two])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"name": "all cases"}))
    with pytest.raises(SystemExit, match="records no validation per case"):
        compare_module.compare([bare], [one])


def test_a_model_folder_without_a_readable_config_is_named_in_one_line(tmp_path: Path) -> None:
    one = _model(tmp_path / "a", [0.3])
    unfinished = tmp_path / "still_training"
    unfinished.mkdir()
    with pytest.raises(SystemExit, match=r"still_training: no config\.json \(the run has not exported its model yet\?\)"):
        compare_module.compare([unfinished], [one])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(SystemExit, match=r"broken/config\.json is not valid JSON"):
        compare_module.compare([one], [broken])
