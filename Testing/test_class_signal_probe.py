"""benchmarks/class_signal_probe.py: recipes given per fold, and the printed table of the class signal."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCHMARKS))
_SPEC = importlib.util.spec_from_file_location("class_signal_probe", _BENCHMARKS / "class_signal_probe.py")
probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe)


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
