"""benchmarks/synthesis_smoothing_probe.py: runs end to end on a fold of phantom cases with a tiny model."""

from __future__ import annotations

import json
import shlex

import numpy as np

from conftest import PHANTOM_BRATS_IDS, load_benchmark, training_cache_of, write_random_model
from MedSynthLib.synthesis.networks import MODALITY_ORDER

probe = load_benchmark("synthesis_smoothing_probe")


def test_the_probe_scores_a_held_out_case_from_the_cached_label_map(phantom_brats, tmp_path, torch_threads) -> None:
    model = write_random_model(tmp_path / "tiny", {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=7)
    config = tmp_path / "folds.json"
    config.write_text(json.dumps({"cv_folds": [[PHANTOM_BRATS_IDS[1]], [PHANTOM_BRATS_IDS[0], PHANTOM_BRATS_IDS[2]]]}))
    out = tmp_path / "probe.json"
    argv = ["--model", str(model), "--config", str(config), "--fold", "0", "--data", str(phantom_brats),
            "--cache", str(training_cache_of(phantom_brats)), "--json", str(out)]
    assert probe.main(argv) == 0
    report = json.loads(out.read_text())
    # The report records the arguments it was run with, not those of the process that called main().
    assert shlex.split(report["command"]) == ["python", "benchmarks/synthesis_smoothing_probe.py", *argv]
    assert report["cases"] == [PHANTOM_BRATS_IDS[1]]
    summary = report["summary"]
    assert set(summary) == {"model", "model_smoothed_0.75", "model_smoothed_1.5", "real_smoothed_0.75",
                            "real_smoothed_1.5"}
    # The real image lightly smoothed is close to itself; a random-weight model's output is not.
    assert summary["real_smoothed_0.75"]["mean"] > 0.5 > summary["model"]["mean"]
    assert summary["real_smoothed_0.75"]["mean"] > summary["real_smoothed_1.5"]["mean"]
    assert all(np.isfinite(v) for row in summary.values() for v in row.values())
