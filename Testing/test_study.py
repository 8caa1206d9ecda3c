"""``medsynth study``: the micro config end to end on phantom cases, resume, and bad input.

Four small phantom cases (BraTS 2021 naming, 40x48x44, different seeds) and one
extra tumour label map; the micro config trains a 4-step GAN and 4-step
segmenters on a 2 mm grid, so a whole study takes seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import phantom, write_volume
from MedSynthLib.cli import main

CASE_IDS = ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_cases(root: Path, ids=CASE_IDS, empty_tumour: bool = False) -> Path:
    for seed, case_id in enumerate(ids):
        images, seg = phantom(seed=seed)
        if empty_tumour:
            seg = np.zeros_like(seg)
        for modality, array in images.items():
            write_volume(array, root / case_id / f"{case_id}_{modality}.nii.gz")
        write_volume(seg, root / case_id / f"{case_id}_seg.nii.gz")
    return root


@pytest.fixture(scope="module")
def study_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study_data")
    data = write_cases(root / "cases")
    _, seg = phantom(seed=9)
    extra = root / "extra"
    write_volume(seg, extra / "BraTS2021_09999_seg.nii.gz")
    return data, extra


def study_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["study", "--data", str(data), "-o", str(out), "--config", "micro", "--device", "cpu", "--quiet", *extra]


def assert_bad_input(capsys, args: list[str], out: Path, *needles: str) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("medsynth: error:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists(), "the report folder must not be created on bad input"
    assert not out.with_name(out.name + ".cache").exists(), "no work folder on bad input"
    return lines[0]


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_study(study_data, tmp_path_factory) -> dict:
    """An interrupted study (Ctrl-C during fold 1), its resumed run, and a fully cached rerun."""
    import MedSynthLib.study.segmenter as study_seg

    data, extra = study_data
    root = tmp_path_factory.mktemp("study_run")
    out, work = root / "report", root / "work"
    args = study_args(data, out, "--extra-labels", str(extra), "--work", str(work))

    real_train = study_seg.train_segmenter
    calls = {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_train(*a, **k)

    study_seg.train_segmenter = interrupting
    try:
        assert main(args) == 130
    finally:
        study_seg.train_segmenter = real_train
    assert not out.exists(), "an interrupted study writes no report"
    finished_arms = sorted((work / "arms").glob("*.json"))
    assert len(finished_arms) == 2

    start = time.perf_counter()
    assert main(args) == 0
    resumed_seconds = time.perf_counter() - start
    first = json.loads((out / "report.json").read_text())
    start = time.perf_counter()
    assert main(args + ["--overwrite"]) == 0
    cached_seconds = time.perf_counter() - start
    second = json.loads((out / "report.json").read_text())
    return {"out": out, "work": work, "report": first, "rerun": second, "resumed_seconds": resumed_seconds,
            "cached_seconds": cached_seconds, "data": data}


def test_study_report_contents(finished_study) -> None:
    report, out = finished_study["report"], finished_study["out"]
    for key in ("config", "data", "study_grid", "split", "design", "gan", "segmentation", "fidelity",
                "memorisation", "synthetic_cases", "timings", "software", "command"):
        assert key in report, key
    assert report["config"]["name"] == "micro"
    from MedSynthLib.cases.anatomy import DEFAULT_ANATOMY_MODEL

    assert report["anatomy_model"] == DEFAULT_ANATOMY_MODEL.to_json()
    assert [c["id"] for c in report["data"]["cases"]] == list(CASE_IDS)
    assert all(len(c["sha256"]) == 64 for c in report["data"]["cases"])
    assert len(report["data"]["extra_label_maps"]) == 1
    assert {"torch", "monai", "medsynth"} <= set(report["software"])
    assert report["timings"]["wall_seconds_this_run"] > 0

    # Split by case: every case held out exactly once, never in its own training set.
    held = [c for fold in report["split"] for c in fold["test"]]
    assert sorted(held) == list(CASE_IDS)
    for fold in report["split"]:
        assert not set(fold["test"]) & set(fold["train"])

    seg = report["segmentation"]
    assert set(seg["per_case"]) == {"real", "real+synthetic", "synthetic", "synthetic+finetune"}
    for arm, cases in seg["per_case"].items():
        assert sorted(cases) == list(CASE_IDS)
        for regions in cases.values():
            for region in ("WT", "TC", "ET"):
                assert 0.0 <= regions[region]["dice"] <= 1.0
                hd = regions[region]["hd95"]
                assert hd is None or hd >= 0.0
    for arm in ("real+synthetic", "synthetic", "synthetic+finetune"):
        for region in ("WT", "TC", "ET"):
            entry = seg["paired_vs_real"][arm][region]["dice"]
            assert entry["n"] == len(CASE_IDS)
            assert entry["ci_low"] <= entry["mean_difference"] <= entry["ci_high"]
    budget = report["design"]["step_budget"]
    for arm, runs in seg["training"].items():
        assert all(run["steps"] == budget for run in runs), arm  # the same step budget in every arm
    assert [p["name"] for p in seg["training"]["synthetic+finetune"][0]["phases"]] == ["synthetic", "finetune"]

    for case in report["fidelity"]["per_case"].values():
        for modality in ("t1", "t1ce", "t2", "flair"):
            brain = case["model"][modality]["brain"]
            assert -1.0 <= brain["ssim"] <= 1.0 and brain["mae"] >= 0.0
            assert "tumour" in case["model"][modality]

    memo = report["memorisation"]
    n_synthetic = sum(f["count"] for f in report["synthetic_cases"])
    assert memo["synthetic"]["n"] == n_synthetic == len(CASE_IDS) // 2 * 2 * 2  # 2 folds x 2 cases x 2 each
    assert memo["real_pairs"]["n"] == 6
    assert all(isinstance(e["flagged"], bool) for e in memo["per_case"])
    kinds = {p["kind"] for f in report["synthetic_cases"] for p in f["provenance"]}
    assert {"transform", "insert", "template"} <= kinds

    md = (out / "report.md").read_text()
    for needle in ("| 1. real only |", "| 2. real + synthetic |", "| 3. synthetic only |",
                   "| 4. synthetic, fine-tuned on real |", "SSIM brain", "## Discussion", "## Memorisation",
                   "bootstrap"):
        assert needle in md, needle
    assert "TODO" not in md and "{" not in md.split("## Reproduce")[0].replace("{fold}", "")
    for name in ("dice_boxplot", "fidelity", "montage_real_vs_synthetic", "synthetic_examples", "memorisation"):
        path = out / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, path
        assert f"figures/{name}.png" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report.")], "temporary folders left behind"


def test_study_resume_reuses_caches(finished_study) -> None:
    first, second = finished_study["report"], finished_study["rerun"]
    # The resumed run recomputed only what the interruption left undone.
    computed = first["timings"]["stage_computed_this_run"]
    assert computed["fold 1/2 arm real"] is False and computed["fold 1/2 arm real+synthetic"] is False
    assert computed["fold 1/2 arm synthetic"] is True
    # The fully cached rerun computed nothing and reports identical numbers, much faster.
    assert not any(second["timings"]["stage_computed_this_run"].values())
    assert finished_study["cached_seconds"] < finished_study["resumed_seconds"]
    for key in ("segmentation", "fidelity", "memorisation", "synthetic_cases", "split"):
        assert first[key] == second[key], key


def test_synthetic_cases_replay_from_provenance(finished_study) -> None:
    """A 'transform' synthetic case is rebuilt exactly from its base label map and its edit records."""
    from MedSynthLib.edits import replay
    from MedSynthLib.schema.grid import Grid, LabelMap
    from MedSynthLib.study.data import short_hash

    report, work = finished_study["report"], finished_study["work"]
    fold = report["synthetic_cases"][0]
    prov = next(p for p in fold["provenance"] if p["kind"] == "transform")
    assert prov["edits"] and all("name" in r and "params" in r for r in prov["edits"])
    sha = next(c["sha256"] for c in report["data"]["cases"] if c["id"] == prov["base"])
    base_labels = np.load(next((work / "arrays").glob(f"*/{sha[:24]}_labels.npy")))
    assert short_hash(base_labels) == prov["base_labels_sha256"]
    rebuilt = replay(LabelMap(base_labels, Grid.from_json(prov["grid"])), prov["edits"])
    stored = work / "synthetic" / fold["cache_key"] / f"{prov['name']}_labels.npy"
    np.testing.assert_array_equal(rebuilt.array, np.load(stored))


# --- units -------------------------------------------------------------------------------------


def test_folds_split_by_case() -> None:
    from MedSynthLib.schema.errors import InputError
    from MedSynthLib.study.run import make_folds

    ids = [f"c{i}" for i in range(7)]
    folds = make_folds(ids, 3, seed=1, test_cases=None, data=Path("d"))
    assert sorted(c for f in folds for c in f.test) == ids
    assert all(sorted(f.test + f.train) == ids for f in folds)
    assert make_folds(ids, 3, seed=1, test_cases=None, data=Path("d"))[0].test == folds[0].test  # seeded
    fixed = make_folds(ids, 3, seed=1, test_cases=["c2"], data=Path("d"))
    assert len(fixed) == 1 and fixed[0].test == ["c2"]
    with pytest.raises(InputError, match="cannot be split into 8 folds"):
        make_folds(ids, 8, seed=1, test_cases=None, data=Path("d"))


def test_bootstrap_interval_and_empty_mask_scores() -> None:
    from MedSynthLib.study.report import bootstrap_ci
    from MedSynthLib.study.segmenter import score

    lo, hi = bootstrap_ci([0.1, 0.2, 0.3, 0.4], 2000, 0.95, seed=0)
    assert 0.1 <= lo < 0.25 < hi <= 0.4
    assert bootstrap_ci([0.05] * 5, 500, 0.95, seed=0) == pytest.approx((0.05, 0.05))

    labels = np.zeros((12, 12, 12), np.uint8)
    labels[4:8, 4:8, 4:8] = 5  # oedema only: WT present, TC and ET absent
    pred = np.zeros((3, 12, 12, 12), bool)
    pred[0, 4:8, 4:8, 4:8] = True
    pred[2, 0, 0, 0] = True  # a false-positive ET voxel
    scores = score(pred, labels, (1.0, 1.0, 1.0))
    assert scores["WT"]["dice"] == pytest.approx(1.0) and scores["WT"]["hd95"] == pytest.approx(0.0)
    assert scores["TC"]["dice"] == 1.0 and scores["TC"]["hd95"] == 0.0  # absent in both
    assert scores["ET"]["dice"] == 0.0 and scores["ET"]["hd95"] is None  # present in one only


def test_study_grid_fits_every_brain() -> None:
    from MedSynthLib.study.data import StudyGrid

    grid = StudyGrid.fit([np.array([140.0, 170.0, 130.0]), np.array([150.0, 160.0, 140.0])], 3.0, 6.0, 8)
    assert all(s % 8 == 0 for s in grid.size)
    assert all(s * 3.0 >= e + 12 for s, e in zip(grid.size, (150, 170, 140)))
    g = grid.grid_at(np.array([10.0, -20.0, 5.0]))
    centre = g.index_to_lps((np.array(g.size) - 1) / 2.0)
    np.testing.assert_allclose(centre, [10.0, -20.0, 5.0])


def test_shipped_configs_are_valid() -> None:
    from MedSynthLib.study.run import load_config

    for name in ("micro", "tiny", "paper"):
        config = load_config(name)
        assert config.name == name and config.seg_config.steps > 0 and config.train_config.steps > 0
    assert load_config("paper").grid["spacing_mm"] == 1.0


# --- bad input ---------------------------------------------------------------------------------


def test_fewer_cases_than_folds(study_data, tmp_path, capsys) -> None:
    data, _ = study_data
    out = tmp_path / "report"
    assert_bad_input(capsys, study_args(data, out, "--folds", "5"), out, "4 case(s) cannot be split into 5 folds")


def test_mixed_conventions(study_data, tmp_path, capsys) -> None:
    data = shutil.copytree(study_data[0], tmp_path / "cases")
    odd = data / CASE_IDS[3]
    renamed = data / "BraTS-GLI-00003-000"
    renamed.mkdir()
    for old, new in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f"), ("seg", "seg")):
        (odd / f"{CASE_IDS[3]}_{old}.nii.gz").rename(renamed / f"BraTS-GLI-00003-000-{new}.nii.gz")
    odd.rmdir()
    out = tmp_path / "report"
    assert_bad_input(capsys, study_args(data, out), out, "mixed conventions", "brats2021", "brats2023")


def test_missing_gan_checkpoint(study_data, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert_bad_input(capsys, study_args(study_data[0], out, "--gan-model", str(tmp_path / "gans" / "fold{fold}")),
                     out, "fold1", "no such model folder")


def test_incompatible_gan_checkpoint(study_data, tmp_path, capsys) -> None:
    import torch

    from MedSynthLib.synthesis.models import write_model

    model = tmp_path / "gan"
    write_model(model, {"w": torch.zeros(2)}, {"network": {"in_channels": 3, "out_channels": 1,
                                                            "modalities": ["t1"]},
                                               "intensity": {"t1": {"low": 0.0, "high": 1.0}}})
    out = tmp_path / "report"
    # The model's own check names its config and the mismatch (before the study's compatibility check).
    assert_bad_input(capsys, study_args(study_data[0], out, "--gan-model", str(model)), out,
                     "network: in_channels 3")
    (model / "weights.safetensors").write_bytes(b"corrupt")
    assert_bad_input(capsys, study_args(study_data[0], out, "--gan-model", str(model)), out, "sha256")


def test_no_tumour_voxels(tmp_path, capsys) -> None:
    data = write_cases(tmp_path / "cases", empty_tumour=True)
    out = tmp_path / "report"
    assert_bad_input(capsys, study_args(data, out), out, "no tumour voxel")


def test_bad_config_and_existing_report(study_data, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    args = study_args(study_data[0], out)
    args[args.index("micro")] = "nonexistent"
    assert_bad_input(capsys, args, out, "study config not found")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"folds": 2, "segmenter": {"init_filter": 4}}))
    args[args.index("nonexistent")] = str(bad)
    assert_bad_input(capsys, args, out, "unknown segmenter options")
    out.mkdir()
    rc = main(study_args(study_data[0], out))
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and "Traceback" not in err
    assert not list(out.iterdir())


def test_study_under_torchrun(study_data, tmp_path) -> None:
    """Two CPU processes (gloo): the GAN and the segmenter arms train with DDP; rank 0 writes the report."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    out = tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "MedSynthLib", "study", "--data",
           str(study_data[0]), "-o", str(out), "--config", "micro", "--device", "cpu", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert sorted(report["segmentation"]["cases"]) == list(CASE_IDS)
    assert result.stdout.count("written") == 1  # one rank reports
