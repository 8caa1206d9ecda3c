"""``medsynth study``: the micro config end to end on phantom cases, resume, and bad input.

Four small phantom cases (BraTS 2021 naming, 40x48x44, different seeds) and one
extra tumour label map; the micro config trains a 4-step GAN and 4-step
segmenters on a 2 mm grid, so a whole study takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def older_code(module: str = "MedSynthLib.edits.random_edits") -> Iterator[None]:
    """Inside the block, another source of ``module``: the cache keys another version of MedSynth gave the stages
    that hash it."""
    from MedSynthLib.study import stages

    real_source = stages.inspect.getsource
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages.inspect, "getsource",
                      lambda m: real_source(m) + ("# older\n" if m.__name__ == module else ""))
        yield


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
    assert len(finished_arms) == 2  # two arm-seed runs finished before the interruption

    start = time.perf_counter()
    assert main(args) == 0
    resumed_seconds = time.perf_counter() - start
    first = json.loads((out / "report.json").read_text())
    start = time.perf_counter()
    assert main(args + ["--overwrite"]) == 0
    cached_seconds = time.perf_counter() - start
    second = json.loads((out / "report.json").read_text())
    return {"out": out, "work": work, "report": first, "rerun": second, "resumed_seconds": resumed_seconds,
            "cached_seconds": cached_seconds, "data": data, "args": args}


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
    from MedSynthLib.study.report import ALL_ARMS
    from MedSynthLib.study.statistics import HD95_PENALTY_MM

    assert set(seg["per_case"]) == set(ALL_ARMS)
    assert {"baseline:threshold", "baseline:largest_component", "real", "real+synthetic", "synthetic",
            "synthetic+finetune", "real+classmean", "real+copypaste", "real@25", "real@50"} == set(ALL_ARMS)
    for arm, cases in seg["per_case"].items():
        assert sorted(cases) == list(CASE_IDS)
        for regions in cases.values():
            for region in ("WT", "TC", "ET"):
                assert 0.0 <= regions[region]["dice"] <= 1.0
                assert 0.0 <= regions[region]["hd95"] <= HD95_PENALTY_MM  # the penalty, never dropped
    seeds = report["design"]["seeds_per_arm"]
    assert seeds == 2
    for arm in ("real", "real+synthetic"):
        for case in seg["per_case"][arm].values():
            assert len(case["WT"]["dice_per_seed"]) == seeds
            assert case["WT"]["dice"] == pytest.approx(float(np.mean(case["WT"]["dice_per_seed"])))
        assert len(seg["seed_spread"][arm]["wt_dice_per_seed"]) == seeds
    for arm in ("real+synthetic", "synthetic", "synthetic+finetune", "real+classmean", "real+copypaste", "real@25",
                "real@50"):
        for region in ("WT", "TC", "ET"):
            entry = seg["paired_vs_real"][arm][region]["dice"]
            assert entry["n"] == len(CASE_IDS)
            assert entry["interval"] is None  # 4 cases: no bootstrap interval
            assert 0.0 < entry["p"] <= 1.0 and entry["p"] <= entry["p_holm"] <= 1.0
    gate = seg["gate"]
    assert gate["baseline"] in ("baseline:threshold", "baseline:largest_component")
    assert gate["passed"] == (gate["mean_difference"] > 0 and gate["wins"] > gate["losses"])
    assert set(seg["baseline_fits"]["1"] if "1" in seg["baseline_fits"] else seg["baseline_fits"][1]) == {
        "threshold", "largest_component"}
    assert len(report["git"]["commit"]) == 40 and isinstance(report["git"]["dirty"], bool)
    budget = report["design"]["step_budget"]
    for arm, runs in seg["training"].items():
        assert all(run["steps"] == budget for run in runs), arm  # the same step budget in every arm
        assert len(runs) == seeds * len(report["split"])
    assert [p["name"] for p in seg["training"]["synthetic+finetune"][0]["phases"]] == ["synthetic", "finetune"]
    # Real + synthetic keeps the real-only arm's real patches and adds synthetic ones on top.
    phase = seg["training"]["real+synthetic"][0]["phases"][0]
    assert phase["cases"] == len(report["split"][0]["train"]) and phase["extra_cases"] > 0
    # Control C2 keeps the real patches too, and pastes only the fold's training patients into each other.
    phase = seg["training"]["real+copypaste"][0]["phases"][0]
    assert phase["cases"] == len(report["split"][0]["train"]) and phase["extra_cases"] > 0
    pasted = report["design"]["copy_paste_cases_per_fold"]
    for fold in report["split"]:
        records = pasted[str(fold["fold"])] if str(fold["fold"]) in pasted else pasted[fold["fold"]]
        made = [r for r in records if r["name"]]
        assert made, records
        for record in made:
            assert {record["host"], record["source"]} <= set(fold["train"]) and record["host"] != record["source"]
            assert record["pasted_tumour_voxels"] > 0
    curve = report["design"]["learning_curve_cases_per_fold"]
    for fold in report["split"]:
        lc = curve[str(fold["fold"])] if str(fold["fold"]) in curve else curve[fold["fold"]]
        assert set(lc["real@25"]) <= set(lc["real@50"]) <= set(fold["train"])

    for case in report["fidelity"]["per_case"].values():
        for modality in ("t1", "t1ce", "t2", "flair"):
            brain = case["model"][modality]["brain"]
            assert -1.0 <= brain["ssim"] <= 1.0 and brain["mae"] >= 0.0
            assert "tumour" in case["model"][modality]

    gap = report["fidelity"]["train_vs_held_out_gap"]
    assert [row["fold"] for row in gap] == [1, 2]
    for row, fold in zip(gap, report["split"]):
        assert row["train_cases"] and set(row["train_cases"]) <= set(fold["train"])
        for modality in ("t1", "t1ce", "t2", "flair"):
            assert row[modality]["gap"] == pytest.approx(row[modality]["train"] - row[modality]["held_out"])

    memo = report["memorisation"]
    n_synthetic = sum(f["count"] for f in report["synthetic_cases"])
    assert memo["synthetic"]["n"] == n_synthetic == len(CASE_IDS) // 2 * 2 * 2  # 2 folds x 2 cases x 2 each
    assert memo["real_pairs"]["n"] == 6
    assert all(isinstance(e["flagged"], bool) for e in memo["per_case"])
    kinds = {p["kind"] for f in report["synthetic_cases"] for p in f["provenance"]}
    assert {"transform", "insert", "template"} <= kinds

    md = (out / "report.md").read_text()
    for needle in ("| 1. real only |", "| 2. real + synthetic (same real patches) |", "| 3. synthetic only |",
                   "| 4. synthetic, fine-tuned on real |", "| C2. real + copy-pasted real tumours |",
                   "| B. FLAIR threshold |", "Segmenter gate: ",
                   "SSIM brain", "## Discussion", "Holm", "no interval (n < 20)", "Git commit", "Train vs held-out fidelity"):
        assert needle in md, needle
    assert "TODO" not in md and "{" not in md.split("## Reproduce")[0].replace("{fold}", "")
    for name in ("dice_boxplot", "fidelity", "montage_real_vs_synthetic", "synthetic_examples", "memorisation"):
        path = out / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, path
        assert f"figures/{name}.png" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report.")], "temporary folders left behind"


def test_the_report_counts_the_stages_its_progress_counts(finished_study, capsys) -> None:
    """A cached rerun: the progress lines and the report's "found cached" count speak of the same stages."""
    import re

    capsys.readouterr()
    assert main(finished_study["args"] + ["--overwrite"]) == 0
    counts = [tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+) stages", capsys.readouterr().err)]
    assert counts and counts[-1][0] == counts[-1][1], counts  # the progress ends at its total
    total = counts[-1][1]
    report = json.loads((finished_study["out"] / "report.json").read_text())
    assert len(report["timings"]["stage_computed_this_run"]) == total
    md = (finished_study["out"] / "report.md").read_text()
    assert f"found cached count with the time they took when computed: {total} of {total})" in md


def test_study_resume_reuses_caches(finished_study) -> None:
    first, second = finished_study["report"], finished_study["rerun"]
    # The resumed run recomputed only what the interruption left undone.
    computed = first["timings"]["stage_computed_this_run"]
    assert computed["fold 1/2 arm real seed 1"] is False and computed["fold 1/2 arm real seed 2"] is False
    assert computed["fold 1/2 arm real+synthetic seed 1"] is True
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


def test_empty_mask_scores() -> None:
    from MedSynthLib.study.segmenter import score

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

    for name in ("micro", "tiny", "cpu", "paper"):
        config = load_config(name)
        assert config.name == name and config.seg_config.steps > 0 and config.train_config.steps > 0
        assert config.seg_config.seeds >= (1 if name == "micro" else 3) and config.seg_config.finetune_case_fraction == 0.1
    assert load_config("paper").grid["spacing_mm"] == 1.0
    # The paper config's segmenter is nnU-Net v2 (MedSynthLib/study/nnunet_engine.py); the CPU configs train SegResNet.
    assert load_config("paper").seg_config.engine == "nnunetv2"
    assert {load_config(n).seg_config.engine for n in ("micro", "tiny", "cpu")} == {"segresnet"}


# --- bad input ---------------------------------------------------------------------------------


def test_report_names_the_segmenter_engine(finished_study) -> None:
    import copy

    from MedSynthLib.study.report import render_markdown

    report = copy.deepcopy(finished_study["report"])
    assert "| Segmenter | MONAI SegResNet" in render_markdown(report, {})
    report["config"]["segmenter"].update(engine="nnunetv2", nnunet_configuration="3d_fullres")
    text = render_markdown(report, {})
    assert "| Segmenter | nnU-Net v2 (3d_fullres" in text and "SegResNet" not in text


def test_nnunet_engine_refuses_torchrun(study_data, tmp_path, capsys, monkeypatch) -> None:
    """nnU-Net trains each arm in one process of its own: a study with that engine under torchrun stops at once."""
    micro = json.loads((Path(__file__).resolve().parents[1] / "Resources" / "configs" / "study_micro.json").read_text())
    micro["segmenter"]["engine"] = "nnunetv2"
    config = tmp_path / "micro_nnunet.json"
    config.write_text(json.dumps(micro))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "report"
    args = study_args(study_data[0], out)
    args[args.index("micro")] = str(config)
    assert "without torchrun" in assert_bad_input(capsys, args, out)


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


def test_study_under_torchrun(study_data, finished_study, tmp_path) -> None:
    """Two CPU processes (gloo): the GAN and the segmenter arms train with DDP; rank 0 writes the report.

    The work folder starts with the module's prepared cases (the derived anatomy and the study-grid
    arrays, the same data): every stage that trains or evaluates runs under torchrun.
    """
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    out, work = tmp_path / "report", tmp_path / "work"
    for prepared in ("prepared", "cases", "arrays"):
        shutil.copytree(finished_study["work"] / prepared, work / prepared)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "MedSynthLib", "study", "--data",
           str(study_data[0]), "-o", str(out), "--config", "micro", "--device", "cpu", "--quiet", "--work", str(work)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert sorted(report["segmentation"]["cases"]) == list(CASE_IDS)
    assert result.stdout.count("written") == 1  # one rank reports
    computed = report["timings"]["stage_computed_this_run"]
    assert computed.pop("prepare") is False and computed and all(computed.values())  # trained under torchrun


def test_study_resumes_on_a_fresh_machine_from_saved_records(study_data, finished_study, tmp_path) -> None:
    """Saved records (arms, baseline, GAN models) restored into an empty work folder: the same study
    command recomputes only the cheap stages and reports the same segmentation results."""
    from MedSynthLib.study.records import restore, save

    records, work, out = tmp_path / "records", tmp_path / "fresh_work", tmp_path / "report"
    manifest = save(finished_study["work"], records)
    assert any(k.startswith("arms/") for k in manifest) and any(k.startswith("baseline/") for k in manifest)
    assert any(k.startswith("gan/") and k.endswith("/model/config.json") for k in manifest)
    assert not any(".ckpt" in k or k.startswith(("prepared/", "synthetic/", "fidelity/")) for k in manifest)
    assert sorted(restore(records, work)) == sorted(manifest)
    data, extra = study_data
    assert main(study_args(data, out, "--extra-labels", str(extra), "--work", str(work))) == 0
    report = json.loads((out / "report.json").read_text())
    computed = report["timings"]["stage_computed_this_run"]
    arms_and_gans = {k: v for k, v in computed.items() if " arm " in k or k.endswith(" GAN") or "baseline" in k}
    assert arms_and_gans and not any(arms_and_gans.values()), arms_and_gans
    assert computed["prepare"] is True  # the fresh work folder had to prepare the cases again
    assert report["segmentation"] == finished_study["rerun"]["segmentation"]


def _fake_work(root: Path) -> Path:
    (root / "arms").mkdir(parents=True)
    (root / "arms" / "a1.json").write_text('{"arm": "real"}')
    (root / "arms" / "a2.json").write_text('{"arm": ')  # an unfinished write: not a result
    (root / "arms" / "a3.ckpt").mkdir()
    (root / "arms" / "a3.ckpt" / "weights.safetensors").write_bytes(b"x")
    (root / "baseline").mkdir()
    (root / "baseline" / "b.json").write_text("{}")
    (root / "gan" / "k1" / "model").mkdir(parents=True)
    (root / "gan" / "k1" / "model" / "config.json").write_text("{}")
    (root / "gan" / "k1" / "model" / "generator.safetensors").write_bytes(b"weights")
    (root / "gan" / "k1" / "checkpoints").mkdir()
    (root / "gan" / "k1" / "checkpoints" / "latest.json").write_text("{}")
    (root / "gan" / "k2" / "model").mkdir(parents=True)  # still training: no config.json yet
    (root / "gan" / "k2" / "model" / "generator.safetensors").write_bytes(b"partial")
    (root / "fidelity").mkdir()
    (root / "fidelity" / "f.json").write_text("{}")
    return root


def test_records_keep_only_finished_stages_and_check_their_sums(tmp_path, capsys) -> None:
    from MedSynthLib.study.records import main as records_main

    work, records = _fake_work(tmp_path / "work"), tmp_path / "records"
    assert records_main(["save", str(work), str(records)]) == 0
    manifest = json.loads((records / "records.json").read_text())["files"]
    assert sorted(manifest) == ["arms/a1.json", "baseline/b.json", "gan/k1/model/config.json",
                                "gan/k1/model/generator.safetensors"]
    assert records_main(["save", str(work), str(records)]) == 0  # saving again adds nothing and agrees

    # A file of another run under the same name: refused, the records unchanged.
    (work / "baseline" / "b.json").write_text('{"other": 1}')
    before = (records / "records.json").read_text()
    capsys.readouterr()
    assert records_main(["save", str(work), str(records)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.json" in err[0] and "another run" in err[0]
    assert (records / "records.json").read_text() == before

    # Restoring into a work folder holding a different file: refused before anything is copied.
    fresh = tmp_path / "fresh"
    (fresh / "baseline").mkdir(parents=True)
    (fresh / "baseline" / "b.json").write_text('{"other": 2}')
    assert records_main(["restore", str(records), str(fresh)]) == 2
    assert "not overwritten" in capsys.readouterr().err
    assert sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file()) == ["baseline/b.json"]

    # A tampered record: refused with one line naming it, nothing restored.
    (records / "arms" / "a1.json").write_text('{"arm": "synthetic"}')
    empty = tmp_path / "empty"
    assert records_main(["restore", str(records), str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a1.json" in err[0] and "sha256" in err[0]
    assert not empty.exists()
    assert records_main(["restore", str(tmp_path / "nowhere"), str(empty)]) == 2
    assert "records.json" in capsys.readouterr().err


# --- statistics, the baseline gate, cached stages, re-identification ----------------------------


def test_sign_flip_test_is_exact_for_small_n() -> None:
    import itertools

    from MedSynthLib.study.statistics import sign_flip_test

    d = np.array([0.12, -0.03, 0.05, 0.08, 0.02, -0.01, 0.07, 0.04])
    observed = abs(d.mean())
    flips = [abs((np.array(signs) * d).mean()) >= observed - 1e-12
             for signs in itertools.product((1, -1), repeat=d.size)]
    result = sign_flip_test(d)
    assert result["exact"] and result["p"] == pytest.approx(np.mean(flips))
    assert sign_flip_test(np.zeros(6))["p"] == 1.0


def test_holm_adjustment() -> None:
    from MedSynthLib.study.statistics import holm

    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1, kept monotone; None stays in place.
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None], nan_ok=True)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_intervals_only_where_n_supports_them() -> None:
    from MedSynthLib.study.statistics import MIN_N_INTERVAL, bca_interval, hd95_or_penalty, HD95_PENALTY_MM

    rng = np.random.default_rng(3)
    assert bca_interval(rng.normal(0.1, 0.05, MIN_N_INTERVAL - 1)) is None
    values = rng.normal(0.1, 0.05, 30)
    lo, hi = bca_interval(values, resamples=2000)
    assert lo < values.mean() < hi and hi - lo < 0.1
    assert hd95_or_penalty(None) == HD95_PENALTY_MM == 373.13 and hd95_or_penalty(4.5) == 4.5


def test_minimum_detectable_difference_has_the_stated_power() -> None:
    from scipy.stats import ttest_1samp

    from MedSynthLib.study.statistics import minimum_detectable_difference

    mdd = minimum_detectable_difference(0.05, 27)
    assert 0.02 < mdd < 0.035  # the example: n = 27, SD 0.05 -> about 0.03
    assert minimum_detectable_difference(0.05, 5) > mdd > minimum_detectable_difference(0.05, 100)
    # Monte Carlo check of the power at the computed difference.
    samples = np.random.default_rng(0).normal(mdd, 0.05, (4000, 27))
    power = float(np.mean(ttest_1samp(samples, 0.0, axis=1).pvalue < 0.05))
    assert abs(power - 0.8) < 0.03


def _blob_case(seed: int, speck: bool):
    from MedSynthLib.study.segmenter import SegCase

    rng = np.random.default_rng(seed)
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[2:22, 2:22, 2:22] = 3
    c = rng.integers(8, 14, 3)
    labels[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4, c[2] - 4:c[2] + 4] = 5
    images = rng.normal(0, 0.3, (4, 24, 24, 24)).astype(np.float32)
    images[3][labels == 5] += 2.5
    if speck:
        images[3][19:21, 19:21, 19:21] += 3.0  # a bright speck far from the tumour
    images[:, labels == 0] = 0
    return SegCase(f"case{seed}", images, labels, (1.0, 1.0, 1.0))


def test_flair_threshold_baseline_is_fitted_on_training_cases() -> None:
    from MedSynthLib.study import baseline

    train = [_blob_case(s, speck=True) for s in range(3)]
    test = _blob_case(7, speck=True)
    fitted = baseline.fit(train, "threshold")
    largest = baseline.fit(train, "largest_component")
    assert 1.0 < fitted.threshold < 2.5 and fitted.training_dice > 0.8
    truth = test.labels >= 4

    def dice(mask):
        return 2 * np.count_nonzero(mask & truth) / (np.count_nonzero(mask) + np.count_nonzero(truth))

    plain, kept = fitted.predict(test.images, test.labels), largest.predict(test.images, test.labels)
    assert not plain[1:].any()  # whole tumour only
    assert dice(kept[0]) > dice(plain[0]) > 0.7  # the speck is removed by the largest-component variant


def test_stage_key_follows_code_and_config(tmp_path, monkeypatch) -> None:
    from MedSynthLib.study import stages

    modules = ("MedSynthLib.study.baseline",)
    key = stages.stage_key({"a": 1}, {"steps": 4}, modules)
    assert key == stages.stage_key({"a": 1}, {"steps": 4}, modules)
    assert key != stages.stage_key({"a": 1}, {"steps": 5}, modules)
    assert key != stages.stage_key({"a": 2}, {"steps": 4}, modules)
    assert key != stages.stage_key({"a": 1}, {"steps": 4}, ("MedSynthLib.study.statistics",))
    real_source = stages.inspect.getsource
    monkeypatch.setattr(stages.inspect, "getsource", lambda module: real_source(module) + "# edited\n")
    assert stages.stage_key({"a": 1}, {"steps": 4}, modules) != key  # a code change re-runs the stage
    monkeypatch.undo()
    calls = []
    path = tmp_path / "stage.json"
    first = stages.cached_stage(path, lambda: calls.append(1) or {"x": 1})
    second = stages.cached_stage(path, lambda: calls.append(1) or {"x": 2})
    assert first == ({"x": 1}, True) and second == ({"x": 1}, False) and len(calls) == 1


def test_shape_attack_undoes_rigid_and_scale_edits() -> None:
    from scipy.spatial.transform import Rotation

    from MedSynthLib.study.reidentification import Shape, shape_attack

    rng = np.random.default_rng(0)
    grid = np.indices((40, 40, 40)).reshape(3, -1).T.astype(float)
    candidates = []
    for k in range(6):
        radii = rng.uniform(5, 14, 3)
        centre = rng.uniform(15, 25, 3)
        inside = (((grid - centre) / radii) ** 2).sum(axis=1) <= 1
        candidates.append(Shape(f"p{k}", grid[inside]))
    rotation = Rotation.from_euler("xyz", [30, -20, 25], degrees=True).as_matrix()
    queries = [(Shape(f"q{k}", (c.points - c.points.mean(0)) @ rotation.T * 1.2 * np.array([-1, 1, 1]) + 50), c.name)
               for k, c in enumerate(candidates)]
    similarity = shape_attack(queries, candidates, similarity=True)
    assert similarity["summary"]["top1_accuracy"] == 1.0
    assert similarity["summary"]["chance"] == pytest.approx(1 / 6)


def test_reidentification_on_real_label_maps(real_data) -> None:
    """An unedited case's tumour is re-identified among all real patients (the attack works); a
    parametric tumour in the template matches no patient as well as any unedited case matches itself."""
    import SimpleITK as sitk

    from MedSynthLib.cases.template import template_label_map
    from MedSynthLib.edits import RandomTumourEdit
    from MedSynthLib.schema.labels import Label, tumour_to_schema
    from MedSynthLib.schema.volume_io import read_image
    from MedSynthLib.study.reidentification import Shape, _rigid_points, real_case_files, shape_attack

    files = real_case_files([real_data / "brats2021" / "cases", real_data / "brats_more" / "cases"])
    assert len(files) == 27
    candidates = []
    for name in sorted(files):
        image = read_image(files[name]["seg"])
        wt = tumour_to_schema(sitk.GetArrayFromImage(image), "brats2021") >= Label.NCR
        candidates.append(Shape.from_mask(name, wt, image.GetSpacing()[::-1], step=2))
    rng = np.random.default_rng(1)
    unedited = [(Shape(f"{c.name} moved", _rigid_points(c.points, rng, 10.0, 10.0)), c.name)
                for c in candidates[::6]]
    result = shape_attack(unedited, candidates, similarity=False)
    assert result["summary"]["top1_accuracy"] == 1.0, [c["best"] for c in result["cases"]]
    template = template_label_map()
    drawn = RandomTumourEdit(p_parametric=1.0)(template, 5)
    parametric = Shape.from_mask("template parametric", drawn.array >= Label.NCR, drawn.grid.spacing[::-1], step=2)
    best = shape_attack([(parametric, None)], candidates, similarity=False)["cases"][0]["best_dice"]
    assert best < min(c["source_dice"] for c in result["cases"])


def test_extra_label_map_of_a_real_patient_stays_on_its_side(tmp_path) -> None:
    """An extra tumour label map identical to a real case's (the same patient) is never used in a fold
    that holds that case out."""
    from MedSynthLib.study.config import load_config
    from MedSynthLib.study.run import _Study, check_inputs

    data = write_cases(tmp_path / "cases")
    _, seg = phantom(seed=1)
    write_volume(np.roll(seg, 2, axis=0), data / CASE_IDS[1] / f"{CASE_IDS[1]}_seg.nii.gz")  # its own tumour
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(data / CASE_IDS[1] / f"{CASE_IDS[1]}_seg.nii.gz", extra / "BraTS2021_09998_seg.nii.gz")
    config = load_config("micro")
    inputs = check_inputs(data, tmp_path / "report", config, extra_labels=[extra], device="cpu", folds=None,
                          overwrite=False)
    patients = inputs.extras[0].patients
    assert patients == (CASE_IDS[1],)
    study = _Study(inputs, tmp_path / "work", None, None, False)
    study.extras = inputs.extras
    for fold in inputs.folds:
        used = study.fold_extras(fold)
        assert used == ([] if set(patients) & set(fold.test) else inputs.extras)
    assert any(study.fold_extras(fold) == [] for fold in inputs.folds)


def _copy_paste_case(name: str, seed: int, tumour_centre_kji, shape=(24, 28, 26)):
    """A spherical 'brain' (WM, GM rim) with a tumour (ED shell, ET, NCR core) on a 2 mm study grid."""
    from MedSynthLib.schema.grid import LabelMap
    from MedSynthLib.study.data import StudyGrid
    from MedSynthLib.study.segmenter import make_seg_case

    rng = np.random.default_rng(seed)
    kji = np.indices(shape, dtype=float)
    centre = (np.array(shape) - 1) / 2.0
    radius = np.sqrt(sum((kji[a] - centre[a]) ** 2 for a in range(3)))
    labels = np.where(radius < 10, 3, 0).astype(np.uint8)
    labels[(radius >= 8.5) & (radius < 10)] = 2
    t = np.sqrt(sum((kji[a] - tumour_centre_kji[a]) ** 2 for a in range(3)))
    labels[(t < 4) & (labels > 0)] = 5
    labels[(t < 2.5) & (labels > 0)] = 6
    labels[(t < 1.2) & (labels > 0)] = 4
    images = np.where(labels > 0, rng.normal(100 + 20 * labels, 5, (4,) + shape), 0).astype(np.float32)
    grid = StudyGrid(2.0, (shape[2], shape[1], shape[0])).grid_at(np.array([seed * 7.0, -seed * 3.0, seed * 1.0]))
    return make_seg_case(name, images, labels, grid.spacing), LabelMap(labels, grid)


def test_copy_paste_control_pastes_real_intensities_deterministically() -> None:
    from MedSynthLib.edits.geometry import crop
    from MedSynthLib.schema.labels import tumour_mask
    from MedSynthLib.study.copypaste import make_copy_paste_cases, paste_tumour

    host, host_map = _copy_paste_case("host", 1, (12, 10, 9))
    source, source_map = _copy_paste_case("source", 2, (9, 16, 15))
    case, record = paste_tumour(host, host_map, source, source_map, name="pasted")
    offset = np.array(record["offset_kji"])
    shape = host.labels.shape
    moved_labels = crop(source.labels, -offset, -offset + np.array(shape))
    moved_images = np.stack([crop(np.asarray(c), -offset, -offset + np.array(shape)) for c in source.images])
    pasted = tumour_mask(moved_labels) & (host.labels > 0)
    assert pasted.sum() == record["pasted_tumour_voxels"] > 0
    # Inside the pasted tumour: the source's (z-scored) intensities and labels, exactly.
    assert np.array_equal(case.images[:, pasted], moved_images[:, pasted])
    assert np.array_equal(case.labels[pasted], moved_labels[pasted])
    # Elsewhere the host's label map (its own tumour kept), and its images beyond the blended border.
    assert np.array_equal(case.labels[~pasted], host.labels[~pasted])
    from scipy import ndimage

    far = ndimage.distance_transform_edt(~pasted, sampling=host.spacing) >= 6.0
    assert np.array_equal(case.images[:, far], np.asarray(host.images)[:, far])
    assert record["blended_voxels"] > 0
    border = ~pasted & ~far & (host.labels > 0) & ~tumour_mask(host.labels) & (moved_labels > 0)
    assert not np.array_equal(case.images[:, border], np.asarray(host.images)[:, border])  # blended

    others = [_copy_paste_case(f"case{k}", k, (12, 12 + k, 10)) for k in range(3, 6)]
    train = [(host, host_map), (source, source_map)] + others
    first_cases, first_records = make_copy_paste_cases(train, seed=7)
    again_cases, again_records = make_copy_paste_cases(train, seed=7)
    assert first_records == again_records
    assert all(np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
               for a, b in zip(first_cases, again_cases))
    names = {c.name for c, _ in train}
    assert len(first_cases) == len(train)
    assert all(r["host"] in names and r["source"] in names and r["host"] != r["source"] for r in first_records)
    _, other_records = make_copy_paste_cases(train, seed=8)
    assert [r["source"] for r in other_records] != [r["source"] for r in first_records]


def test_largest_component_post_processing_keeps_the_main_tumour() -> None:
    from MedSynthLib.study.segmenter import keep_largest_component

    masks = np.zeros((3, 12, 12, 12), bool)
    masks[0, 1:5, 1:5, 1:5] = True  # the tumour
    masks[1, 2:4, 2:4, 2:4] = True
    masks[2, 2, 2, 2] = True
    masks[0, 9, 9, 9] = masks[1, 9, 9, 9] = masks[2, 9, 9, 9] = True  # a stray voxel of every region
    kept = keep_largest_component(masks)
    assert kept[0].sum() == 64 and kept[1].sum() == 8 and kept[2].sum() == 1
    assert not kept[:, 9, 9, 9].any()
    single = np.zeros_like(masks)
    single[0, 3, 3, 3] = True
    assert np.array_equal(keep_largest_component(single), single)


def test_blur_augmentation_is_reproducible_and_keeps_the_patches() -> None:
    """``blur`` smooths some contrasts of some patches, the same for the same (seed, step, rank), and
    leaves everything else as without it: the same patches, flips and intensity jitter."""
    from dataclasses import replace

    import torch

    from MedSynthLib.schema.errors import InputError
    from MedSynthLib.schema.labels import Label
    from MedSynthLib.study.segmenter import SegConfig, make_seg_case, sample_batch

    rng = np.random.default_rng(5)
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[2:38, 2:38, 2:38] = 3
    labels[8:14, 20:30, 8:14] = Label.ED
    images = rng.normal(0, 1, (4,) + labels.shape).astype(np.float32)
    case = make_seg_case("c", images, labels, (1.0, 1.0, 1.0))
    plain = SegConfig(patch_size=16, batch_size=6)
    blurred = replace(plain, blur=2.0)
    x0, y0 = sample_batch([case], plain, seed=1, step=3)
    x1, y1 = sample_batch([case], blurred, seed=1, step=3)
    assert torch.equal(y0, y1) and len(torch.unique(y0.flatten(1).sum(1))) > 1  # the same, distinct patches
    x1_again, _ = sample_batch([case], blurred, seed=1, step=3)
    assert torch.equal(x1, x1_again)
    # Per (patch, contrast): either exactly the plain patch or a smoother one.
    roughness = lambda x: np.abs(np.diff(x.numpy(), axis=-1)).mean(axis=(-3, -2, -1))  # noqa: E731
    same = torch.isclose(x0, x1).flatten(2).all(dim=2).numpy()
    assert same.any() and (~same).any()
    ratio = roughness(x1)[~same] / roughness(x0)[~same]
    assert np.median(ratio) < 0.5  # sigmas are drawn from U(0, 2) voxels
    with pytest.raises(InputError, match="blur"):
        SegConfig.from_json({"blur": -1.0}, "config.json")


# Every nested option of a study config is checked before the study starts: one line naming the config
# file and the option, exit status 2, nothing written (a bad option used to pass and fail hours later).
BAD_NESTED_CONFIGS = {
    "per_case_text": ({"synthetic": {"per_case": "abc", "kinds": ["transform"]}}, "synthetic.per_case"),
    "per_case_zero": ({"synthetic": {"per_case": 0, "kinds": ["transform"]}}, "synthetic.per_case"),
    "per_case_bool": ({"synthetic": {"per_case": True, "kinds": ["transform"]}}, "synthetic.per_case"),
    "per_case_fraction": ({"synthetic": {"per_case": 1.5, "kinds": ["transform"]}}, "synthetic.per_case"),
    "kinds_text": ({"synthetic": {"kinds": "transform"}}, "synthetic.kinds"),
    "kinds_number": ({"synthetic": {"kinds": 3}}, "synthetic.kinds"),
    "kinds_empty": ({"synthetic": {"kinds": []}}, "synthetic.kinds"),
    "kinds_unknown": ({"synthetic": {"kinds": ["bogus"]}}, "synthetic.kinds"),
    "kinds_item_number": ({"synthetic": {"kinds": [1]}}, "synthetic.kinds"),
    "precision_fp8": ({"synthetic": {"kinds": ["transform"], "precision": "fp8"}}, "synthetic.precision"),
    "precision_number": ({"synthetic": {"kinds": ["transform"], "precision": 16}}, "synthetic.precision"),
    "synthetic_unknown": ({"synthetic": {"kinds": ["transform"], "nonsense": 1}}, "synthetic.nonsense"),
    "edit_not_object": ({"synthetic": {"kinds": ["transform"], "edit": 3}}, "synthetic.edit"),
    "edit_unknown": ({"synthetic": {"kinds": ["transform"], "edit": {"wobble": 1}}}, "synthetic.edit.wobble"),
    "edit_flip_about": ({"synthetic": {"kinds": ["transform"], "edit": {"flip_about": "left"}}},
                        "synthetic.edit.flip_about"),
    "edit_translate_text": ({"synthetic": {"kinds": ["transform"], "edit": {"translate_mm": "20"}}},
                            "synthetic.edit.translate_mm"),
    "edit_scale_one": ({"synthetic": {"kinds": ["transform"], "edit": {"scale_range": [0.7]}}},
                       "synthetic.edit.scale_range"),
    "edit_max_tries": ({"synthetic": {"kinds": ["transform"], "edit": {"max_tries": 0}}},
                       "synthetic.edit.max_tries"),
    "edit_p_parametric": ({"synthetic": {"kinds": ["transform"], "edit": {"p_parametric": 0.5}}},
                          "synthetic.edit.p_parametric"),
    "pairs_negative": ({"memorisation": {"max_real_pairs": -5}}, "memorisation.max_real_pairs"),
    "pairs_zero": ({"memorisation": {"max_real_pairs": 0}}, "memorisation.max_real_pairs"),
    "pairs_text": ({"memorisation": {"max_real_pairs": "2000"}}, "memorisation.max_real_pairs"),
    "pairs_fraction": ({"memorisation": {"max_real_pairs": 1.5}}, "memorisation.max_real_pairs"),
    "memorisation_unknown": ({"memorisation": {"nonsense": 1}}, "memorisation.nonsense"),
    "threads_zero": ({"threads": 0}, "threads"),
    "threads_negative": ({"threads": -2}, "threads"),
    "bootstrap_huge": ({"bootstrap": 10 ** 12}, "bootstrap"),
}


@pytest.mark.parametrize("name", sorted(BAD_NESTED_CONFIGS))
def test_bad_nested_config_option(name, study_data, tmp_path, capsys) -> None:
    options, option_path = BAD_NESTED_CONFIGS[name]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict({"folds": 2}, **options)))
    out = tmp_path / "report"
    args = study_args(study_data[0], out)
    args[args.index("micro")] = str(bad)
    line = assert_bad_input(capsys, args, out, str(bad), option_path)
    assert any(word in line for word in ("expected", "must", "choose from", "unknown", "outside")), line


def test_config_fills_in_what_the_study_reads() -> None:
    """A synthetic section without kinds: the study used three kinds but prepared no template for the third."""
    from MedSynthLib.study.config import StudyConfig

    config = StudyConfig.from_json({"synthetic": {"per_case": 1}}, "cfg.json")
    assert config.synthetic["kinds"] == ["transform", "insert", "template"]
    assert config.synthetic["precision"] == "fp32"
    assert StudyConfig.from_json({"memorisation": {}}, "cfg.json").memorisation == {"max_real_pairs": 2000}


def test_a_precision_the_device_cannot_run_is_refused_before_the_study(study_data, tmp_path, capsys) -> None:
    """``synthetic.precision: fp16`` with ``--device cpu`` passed every check and failed at the synthesis stage,
    after the GAN had trained; the device is known before the study starts, so it is refused there."""
    config = tmp_path / "fp16.json"
    config.write_text(json.dumps({"folds": 2, "synthetic": {"kinds": ["transform"], "precision": "fp16"}}))
    out = tmp_path / "report"
    args = study_args(study_data[0], out)
    args[args.index("micro")] = str(config)
    assert "--device" in args and args[args.index("--device") + 1] == "cpu"
    assert_bad_input(capsys, args, out, "synthetic.precision", "fp16", "CPU")
