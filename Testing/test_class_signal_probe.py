"""benchmarks/class_signal_probe.py: recipes given per fold, and the printed table of the class signal."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

probe = load_benchmark("class_signal_probe")


def test_a_recipe_names_one_model_per_fold() -> None:
    assert probe.parse_recipe("start=a/model,b/model", [0, 2]) == ("start", ["a/model", "b/model"])
    for text in ("start=a/model", "a/model,b/model", "=a,b", "start=a,b,c"):
        with pytest.raises(SystemExit, match="one model for each of the folds"):
            probe.parse_recipe(text, [0, 2])


def test_the_table_gives_every_class_in_the_patient_frame() -> None:
    summary = {"t2": {"brain_spread_ratio": 0.81, "classes": {
        "GM": {"patient_frame_minus_real": 0.14}, "NCR": {"patient_frame_minus_real": -0.48}}}}
    assert probe.table("default", summary) == [
        "default: synthetic minus real median, patient's frame (z), mean over cases",
        "  t2    GM +0.14 NCR -0.48  spread 0.81"]
