"""The study's nnU-Net v2 engine (``"engine": "nnunetv2"``, the paper config) on tiny synthetic cases.

nnU-Net plans, preprocesses and trains a two-phase arm (train, then fine-tune from those weights) for
a few iterations on CPU in its child process, then predicts a held-out case. What is checked: the
arm's phases reach nnU-Net as its folds with the right cases and iteration counts, the fine-tune
starts from the first phase's weights, the predicted regions come back on the case's grid, the
weights are safetensors with their sha256 checked before prediction, and no checkpoint is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from MedSynthLib.schema.errors import MedSynthError
from MedSynthLib.study.segmenter import Phase, SegCase, SegConfig

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is installed by the test extra")


def _case(seed: int, shape=(24, 28, 24)) -> SegCase:
    """A box of 'white matter' with a bright oedema cube holding an enhancing core on FLAIR / T1ce."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    labels[2:-2, 2:-2, 2:-2] = 3
    c = rng.integers(9, 15, 3)
    labels[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5, c[2] - 5:c[2] + 5] = 5
    labels[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = 6
    images = rng.normal(0, 0.3, (4,) + shape).astype(np.float32)
    images[3][labels == 5] += 2.5
    images[1][labels == 6] += 3.0
    images[:, labels == 0] = 0
    return SegCase(f"case{seed}", images, labels, (2.0, 2.0, 2.0))


def test_phase_iterations_keep_the_real_exposure() -> None:
    from MedSynthLib.study.nnunet_engine import phase_iterations

    real, synthetic = [_case(0), _case(1)], [_case(2), _case(3), _case(4), _case(5)]
    assert phase_iterations(Phase("real", real, 0, 100)) == 100
    # Six cases drawn uniformly: each real case comes up 100 / 2 times in expectation, as in the real-only arm.
    assert phase_iterations(Phase("real+synthetic", real, 0, 100, extra=synthetic)) == 300
    assert phase_iterations(Phase("finetune", real, 70, 100)) == 30


@pytest.fixture(scope="module")
def trained_arm(tmp_path_factory):
    from MedSynthLib.study.nnunet_engine import train_nnunet

    root = tmp_path_factory.mktemp("nnunet_arm") / "arm.nnunet"
    cases = [_case(s) for s in range(4)]
    config = SegConfig(engine="nnunetv2", steps=6, iterations_per_epoch=2, nnunet_val_iterations=1,
                       nnunet_processes=0, lr=1e-2, largest_component=True)
    phases = [Phase("synthetic", cases[:3], 0, 4), Phase("finetune", cases[3:], 4, 6)]
    model, info = train_nnunet(phases, config, "cpu", seed=5, root=root)
    return model, info, config, root


def test_nnunet_trains_each_phase_as_a_fold(trained_arm) -> None:
    model, info, config, root = trained_arm
    assert info["engine"] == "nnunetv2" and info["steps"] == 6
    assert [(p["name"], p["fold"], p["epochs"], p["iterations_per_epoch"]) for p in info["phases"]] == [
        ("synthetic", 0, 2, 2), ("finetune", 1, 1, 2)]
    splits = json.loads(next(root.rglob("splits_final.json")).read_text())
    assert splits == [{"train": ["case0000", "case0001", "case0002"], "val": ["case0000", "case0001"]},
                      {"train": ["case0003"], "val": ["case0003"]}]
    logs = {p.parent.name: p.read_text() for p in root.rglob("training_log_*.txt")}
    assert set(logs) == {"fold_0", "fold_1"}
    assert "Epoch 1" in logs["fold_0"] and "Epoch 1" not in logs["fold_1"]  # 2 epochs, then 1
    # No pickled weights: nnU-Net's own checkpoints are off, the weights are safetensors + JSON. (nnU-Net's
    # preprocessed cases keep their properties as .pkl, its internal format; the study deletes the folder.)
    assert not [p for p in root.rglob("*") if p.suffix in (".pth", ".pt")]
    assert not [p for p in root.rglob("*.pkl") if "preprocessed" not in p.parts]
    meta = json.loads((root / "model" / "model.json").read_text())
    assert meta["engine"] == "nnunetv2" and len(meta["weights_sha256"]) == 64


def test_finetune_starts_from_the_first_phase(trained_arm) -> None:
    """The fine-tune phase starts from exactly the weights the first phase ended with (recorded by sha256)."""
    _, _, _, root = trained_arm
    first, second = json.loads((root / "model" / "model.json").read_text())["phases"]
    assert first["weights_at_start_sha256"] != first["weights_at_end_sha256"]  # the first phase trained
    assert second["weights_at_start_sha256"] == first["weights_at_end_sha256"]
    assert second["weights_at_end_sha256"] != second["weights_at_start_sha256"]


def test_nnunet_predicts_regions_on_the_case_grid(trained_arm) -> None:
    from MedSynthLib.study.nnunet_engine import predict_nnunet
    from MedSynthLib.study.segmenter import score

    model, _, config, _ = trained_arm
    held_out = _case(11)
    masks = predict_nnunet(model, [held_out], config, "cpu")
    assert masks[held_out.name].shape == (3,) + held_out.labels.shape and masks[held_out.name].dtype == bool
    tc, et = masks[held_out.name][1], masks[held_out.name][2]
    assert not (et & ~tc).any()  # the regions nest: enhancing inside the core
    scores = score(masks[held_out.name], held_out.labels, held_out.spacing)
    assert set(scores) == {"WT", "TC", "ET"} and 0.0 <= scores["WT"]["dice"] <= 1.0


def test_tampered_weights_are_refused(trained_arm, tmp_path) -> None:
    import shutil

    from MedSynthLib.study.nnunet_engine import NNUnetModel, predict_nnunet

    model, _, config, root = trained_arm
    copy = tmp_path / "arm.nnunet"
    shutil.copytree(root / "model", copy / "model")
    shutil.copytree(root / "results", copy / "results")
    weights = copy / "model" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MedSynthError, match="nnU-Net predict failed"):
        predict_nnunet(NNUnetModel(copy, model.configuration), [_case(12)], config, "cpu")
    assert "sha256 does not match" in (copy / "predict.log").read_text()


def test_unknown_engine_is_refused() -> None:
    from MedSynthLib.schema.errors import InputError

    with pytest.raises(InputError, match="engine 'nnunet'"):
        SegConfig.from_json({"engine": "nnunet"}, Path("study.json"))
