"""benchmarks/mirror_average_ab_compare.py: two recipes' held-out reports compared case by case, per arm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark
from MedSynthLib.schema.labels import MODALITIES

ab = load_benchmark("mirror_average_ab_compare")


def _arm(ssim: float) -> dict:
    return {"brain_ssim": ssim, "brain_psnr": 20.0 + ssim, "tumour_ssim": ssim / 2,
            **{f"{m}_ssim": ssim for m in MODALITIES}, "rules_passed": 7, "rules_checked": 8,
            "checkerboard_ratio": {m: ssim / 10 for m in MODALITIES}}


def _report(path: Path, cases: dict[tuple[int, str], tuple[float, float]]) -> Path:
    rows = [{"fold": fold, "case": case, "one_pass": _arm(one), "mirror_average": _arm(mirror)}
            for (fold, case), (one, mirror) in cases.items()]
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_the_new_runs_are_compared_with_the_reference_on_their_cases_only(tmp_path: Path) -> None:
    reference = _report(tmp_path / "ref.json", {(0, "a"): (0.30, 0.31), (0, "b"): (0.40, 0.41),
                                                (1, "c"): (0.20, 0.21), (2, "d"): (0.5, 0.5)})
    new0 = _report(tmp_path / "f0.json", {(0, "a"): (0.32, 0.34), (0, "b"): (0.39, 0.42)})
    new1 = _report(tmp_path / "f1.json", {(1, "c"): (0.25, 0.26)})
    out = tmp_path / "cmp.json"
    assert ab.main(["--new", str(new0), str(new1), "--reference", str(reference), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cases"] == ["0/a", "0/b", "1/c"]  # fold 2's case is not in the new runs
    mirror = result["mirror_average"]["scores"]["brain_ssim"]
    assert mirror["mean_difference"] == pytest.approx((0.03 + 0.01 + 0.05) / 3)
    assert (mirror["wins"], mirror["losses"], mirror["n"]) == (3, 0, 3)
    one = result["one_pass"]["scores"]["brain_ssim"]
    assert (one["wins"], one["losses"]) == (2, 1) and one["new"] == pytest.approx((0.32 + 0.39 + 0.25) / 3)
    assert result["one_pass"]["scores"]["brain_psnr"]["mean_difference"] == pytest.approx(one["mean_difference"])
    assert result["mirror_average"]["rules"] == [21, 24]
    assert result["mirror_average"]["checkerboard_median"]["t1"] == pytest.approx(0.034)


def test_a_case_the_reference_lacks_or_a_case_given_twice_is_refused(tmp_path: Path) -> None:
    reference = _report(tmp_path / "ref.json", {(0, "a"): (0.3, 0.3)})
    new = _report(tmp_path / "new.json", {(0, "a"): (0.3, 0.3), (1, "z"): (0.3, 0.3)})
    with pytest.raises(SystemExit, match="the reference did not score fold 1 z"):
        ab.main(["--new", str(new), "--reference", str(reference)])
    twice = _report(tmp_path / "twice.json", {(0, "a"): (0.3, 0.3)})
    with pytest.raises(SystemExit, match="fold 0 case a is in the reports twice"):
        ab.main(["--new", str(twice), str(twice), "--reference", str(reference)])
