"""Training (``medsynth train``): outputs, no pickles, exact resume after kill -9, DDP, and the pieces.

Everything runs on three small phantom cases (BraTS 2021 naming) with a tiny
network (channels (4, 8), one stride-2 level, 16^3 patches) and one CPU thread,
so a run takes seconds, most of it start-up.  The runs share one cache of the
prepared cases, and run ``main()`` in this process unless the program itself is
under test (its output, its command record, a kill -9, torchrun).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PHANTOM_BRATS_IDS, REPO, training_cache_of
from MedSynthLib.cli import main
from MedSynthLib.schema.errors import InputError, MedSynthError
from MedSynthLib.synthesis.networks import NetworkConfig
from MedSynthLib.training.train import (TrainConfig, discriminator_loss, generator_adversarial_loss,
                                        learning_rate, train)

CASE_IDS = PHANTOM_BRATS_IDS
VAL_CASE = CASE_IDS[2]
TINY_NETWORK = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "disc_channels": 4, "disc_layers": 2}
MICRO = {"network": TINY_NETWORK, "patch_size": 16, "steps": 6, "checkpoint_every": 2, "val_every": 6,
         "log_every": 1, "threads": 1, "val_cases": [VAL_CASE], "precision": "fp32"}
CHECKPOINT_FILES = ("generator", "discriminator", "optimizer_g", "optimizer_d")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


def bf16_network() -> dict:
    """The tiny network for bf16 runs: one discriminator layer instead of two.

    With two layers on a 16^3 patch the discriminator's last convolution maps a 3^3
    feature map to 2^3 with a 4^3 kernel, and torch 2.13's oneDNN bf16 conv3d
    backward on the CPU then returns NaN weight gradients now and then (uninitialised
    memory: same inputs, NaN in some calls only; it does not happen with mkldnn
    disabled, nor for the 11^3 maps of the real configuration).  One layer keeps
    every map >= 6^3.
    """
    return dict(TINY_NETWORK, disc_layers=1)


def medsynth_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("medsynth")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "MedSynthLib"]


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


pytestmark = pytest.mark.usefixtures("torch_threads")  # in-process runs set torch's thread count


@pytest.fixture(scope="session")
def brats_data(phantom_brats) -> Path:
    """Three phantom cases in BraTS 2021 naming (different seeds); the last one is the validation case."""
    return phantom_brats


def write_config(path: Path, **changes) -> Path:
    path.write_text(json.dumps(dict(MICRO, **changes), indent=1))
    return path


def train_args(data: Path, run: Path, config: Path, *extra: str) -> list[str]:
    cache = [] if "--cache" in extra else ["--cache", str(training_cache_of(data))]
    return ["train", "--data", str(data), "-o", str(run), "--config", str(config), "--device", "cpu", *cache,
            *extra]


def train_cmd(data: Path, run: Path, config: Path, *extra: str) -> list[str]:
    return medsynth_cmd() + train_args(data, run, config, *extra)


def run_train(data: Path, run: Path, config: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``medsynth train`` as a program (where its process is what the test checks)."""
    result = subprocess.run(train_cmd(data, run, config, *extra), capture_output=True, text=True,
                            timeout=timeout, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_here(data: Path, run: Path, config: Path, *extra: str) -> None:
    """``medsynth train`` through ``main()`` in this process (the same code without a new interpreter)."""
    args = train_args(data, run, config, *extra)
    assert main(args + ["--command-line", "medsynth " + " ".join(args)]) == 0


@pytest.fixture(scope="session")
def base_model(brats_data: Path, tmp_path_factory) -> Path:
    """A 2-step run of the micro config (checkpoint at step 2), trained once for the fine-tuning tests.

    Tests read it and never write into it (they start their own runs from its model).
    """
    root = tmp_path_factory.mktemp("base_run")
    import torch as torch_module

    threads = torch_module.get_num_threads()
    try:
        train_here(brats_data, root / "base", write_config(root / "base.json", steps=2, checkpoint_every=2,
                                                            val_every=1000))
    finally:
        torch_module.set_num_threads(threads)
    return root / "base"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_no_pickle(run: Path) -> None:
    """No pickled file anywhere in the run; safetensors load as safetensors, npz without pickle."""
    files = [p for p in run.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.lower().endswith(PICKLE_SUFFIXES)]
    for path in files:
        if path.suffix == ".safetensors":
            assert load_tensors(path), path
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                for key in data.files:
                    data[key]  # raises if the member needs pickle
        elif path.suffix == ".json":
            json.loads(path.read_text())


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_end_to_end(brats_data: Path, tmp_path: Path, precision: str) -> None:
    network = TINY_NETWORK if precision == "fp32" else bf16_network()
    config = write_config(tmp_path / "micro.json", precision=precision, network=network)
    run = tmp_path / "run"
    result = run_train(brats_data, run, config)
    assert result.stdout.strip().splitlines() == [f"{run / 'model'}: model written"]

    saved = json.loads((run / "train_config.json").read_text())
    assert saved["command"].startswith("medsynth train ") and "--config" in saved["command"]
    assert saved["config"]["network"]["channels"] == [4, 8]
    assert saved["config"]["precision"] == precision and saved["precision"] == precision
    assert saved["world_size"] == 1 and saved["device"] == "cpu"

    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest == {"step": 6, "path": "step_0000006"}
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_0000004", "step_0000006"]  # the two newest are kept
    assert not list((run / "checkpoints").glob(".*"))  # no temporary checkpoint folders left
    for step in steps:
        folder = run / "checkpoints" / step
        for name in CHECKPOINT_FILES:
            assert (folder / f"{name}.safetensors").is_file()
        state = json.loads((folder / "state.json").read_text())
        assert state["step"] == int(step.split("_")[1])
        assert state["optimizer_g"]["param_groups"] and state["optimizer_d"]["param_groups"]

    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in (run / "montages").glob("*.png")] == ["step_0000006.png"]

    model = run / "model"
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "weights.safetensors"]
    model_config = json.loads((model / "config.json").read_text())
    assert model_config["format"] == "medsynth-model"
    assert model_config["training"]["precision"] == precision
    assert model_config["training"]["world_size"] == 1
    assert model_config["training"]["data"]["cases"] == 2  # the validation case is held out
    assert set(model_config["intensity"]) == {"t1", "t1ce", "t2", "flair"}
    assert {"brain_ssim", "brain_psnr", "brain_mae"} <= set(model_config["validation"])
    weights = load_tensors(model / "weights.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(t.dtype == torch.float32 for t in weights.values())

    from MedSynthLib.synthesis.models import resolve_model

    assert resolve_model(model).sha256 == model_config["weights_sha256"]
    assert_no_pickle(run)
    assert_no_pickle(training_cache_of(brats_data))  # the prepared cases this run used and added to


# --- resume after kill -9 ------------------------------------------------------------------------


def _latest_step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "latest.json").read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return -1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_kill_is_exact(brats_data: Path, tmp_path: Path, precision: str, capsys) -> None:
    # Enough steps after the first checkpoints that the kill lands mid-run (a step takes ~20 ms).
    network = TINY_NETWORK if precision == "fp32" else bf16_network()
    config = write_config(tmp_path / "resume.json", steps=40, checkpoint_every=2, val_every=1000,
                          precision=precision, network=network)
    run_a, run_b = tmp_path / "A", tmp_path / "B"
    train_here(brats_data, run_a, config)  # uninterrupted, in this process; B is a program killed mid-run

    process = subprocess.Popen(train_cmd(brats_data, run_b, config), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=subprocess_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 150
        while _latest_step(run_b) < 4:
            assert process.poll() is None, f"run B ended (rc {process.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "run B wrote no checkpoint in time"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    killed_at = _latest_step(run_b)
    assert 4 <= killed_at < 40
    assert not (run_b / "model").exists()

    capsys.readouterr()
    train_here(brats_data, run_b, config, "--resume")
    assert "model written" in capsys.readouterr().out

    a = load_tensors(run_a / "model" / "weights.safetensors")
    b = load_tensors(run_b / "model" / "weights.safetensors")
    assert a.keys() == b.keys()
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nresume ({precision}, killed after checkpoint {killed_at}): max |A - B| = {max_diff:g} "
          f"over {len(a)} tensors")
    # Exact: patches come from a generator seeded by (seed, step, rank), the optimiser state is
    # restored bit for bit and one thread makes the CPU kernels deterministic.
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in CHECKPOINT_FILES:  # the final checkpoints agree too (discriminator and Adam moments)
        ca = load_tensors(run_a / "checkpoints" / "step_0000040" / f"{name}.safetensors")
        cb = load_tensors(run_b / "checkpoints" / "step_0000040" / f"{name}.safetensors")
        assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca), name
    assert_no_pickle(run_b)


def test_resume_keeps_the_recorded_threads(brats_data: Path, base_model: Path, monkeypatch) -> None:
    # `medsynth train --resume` without --config must not fall back to torch's default of every core:
    # two runs sharing a CPU would each take all of it.  The base run recorded threads 1; the call
    # stops at the thread setting, before anything is written.
    assert json.loads((base_model / "train_config.json").read_text())["config"]["threads"] == 1

    class Stop(Exception):
        pass

    calls: list[int] = []

    def record(threads: int) -> None:
        calls.append(threads)
        raise Stop

    monkeypatch.setattr(torch, "set_num_threads", record)
    with pytest.raises(Stop):
        train(brats_data, base_model, TrainConfig(), resume=True, device="cpu", progress=False)
    assert calls == [1]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("medsynth: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def test_resume_without_checkpoint_and_non_empty_folder(brats_data: Path, tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "micro.json")
    base = ["train", "--data", str(brats_data), "--config", str(config), "--device", "cpu",
            "--cache", str(training_cache_of(brats_data))]

    # --resume on a folder that never held a run.
    assert main(base + ["-o", str(tmp_path / "never"), "--resume"]) == 2
    assert "nothing to resume" in _one_error_line(capsys)
    assert not (tmp_path / "never").exists()

    # --resume on a run killed before its first checkpoint restarts it from step 0 (issue 15, item 6).
    early = tmp_path / "early"
    early.mkdir()
    (early / "train_config.json").write_text(json.dumps({"command": "medsynth train",
                                                         "config": dict(MICRO, steps=2, val_every=2)}))
    assert main(resume_args(brats_data, early)) == 0  # no --config: the recorded one differs (val_every)
    assert "restarting it from step 0" in capsys.readouterr().err
    assert json.loads((early / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert (early / "model" / "weights.safetensors").exists()

    # A new run into a non-empty folder.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(base + ["-o", str(busy)]) == 2
    assert "not empty" in _one_error_line(capsys)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

    # Unknown options in the config file.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(MICRO, stepz=3)))
    assert main(["train", "--data", str(brats_data), "-o", str(tmp_path / "x"), "--config", str(bad)]) == 2
    assert "stepz" in _one_error_line(capsys)
    assert not (tmp_path / "x").exists()


# --- DDP ----------------------------------------------------------------------------------------


def test_ddp_ranks_stop_together_on_a_run_that_learns_nothing(brats_data: Path, tmp_path: Path) -> None:
    """Under torchrun every rank leaves at the same step (no rank left waiting in a collective)."""
    config = write_config(tmp_path / "frozen.json", lr=0.0, divergence_window=2, val_every=100)
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "MedSynthLib", "train", "--data", str(brats_data), "-o", str(run), "--config", str(config),
               "--device", "cpu", "--cache", str(training_cache_of(brats_data))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=subprocess_env(), cwd=REPO)
    assert result.returncode != 0
    assert "the generator has not learned" in result.stderr, result.stderr[-4000:]
    assert not (run / "model").exists()


def test_ddp_two_cpu_processes(brats_data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ddp.json", steps=4, val_every=4)
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "MedSynthLib", "train", "--data", str(brats_data), "-o", str(run), "--config", str(config),
               "--device", "cpu", "--cache", str(training_cache_of(brats_data))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("model written") == 1, result.stdout
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["world_size"] == 2
    model_config = json.loads((run / "model" / "config.json").read_text())
    assert model_config["training"]["world_size"] == 2
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json", "weights.safetensors"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary model folders
    assert _latest_step(run) == 4
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 logs alone
    weights = load_tensors(run / "model" / "weights.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert_no_pickle(run)


# --- the pieces ---------------------------------------------------------------------------------


def test_learning_rate_schedule() -> None:
    config = TrainConfig(steps=100, lr=2e-4, lr_decay_fraction=0.5)
    rates = [learning_rate(config, step) for step in range(100)]
    assert rates[0] == rates[50] == pytest.approx(2e-4)  # constant over the first half
    assert rates[75] == pytest.approx(1e-4)  # linear decay over the second half
    assert rates[99] == pytest.approx(2e-4 / 50)
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert min(rates) > 0
    assert learning_rate(config, 100) == 0.0
    constant = TrainConfig(steps=10, lr=1e-3, lr_decay_fraction=0.0)
    assert {learning_rate(constant, s) for s in range(10)} == {1e-3}


def test_lr_scheduler_sets_the_schedule_and_resumes_on_it() -> None:
    """torch's LambdaLR sets exactly the closed-form rate at every step, also when started mid-run."""
    from MedSynthLib.training.train import lr_scheduler

    config = TrainConfig(steps=100, lr=2e-4, lr_decay_fraction=0.5)

    def rates(start: int) -> list[float]:
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=config.lr)
        if start:
            optimizer.param_groups[0]["lr"] = 1.234  # a checkpoint holds the decayed rate, not the base
        scheduler = lr_scheduler(optimizer, config, start)
        seen = []
        for _ in range(start, config.steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    uninterrupted = rates(0)
    assert uninterrupted == [learning_rate(config, step) for step in range(100)]
    assert rates(63) == uninterrupted[63:]  # bit for bit: a resumed run continues the same schedule


def test_least_squares_loss_is_monais_and_equals_lsgan() -> None:
    """The LSGAN terms come from monai.losses.PatchAdversarialLoss and equal the LSGAN formulas."""
    generator = torch.Generator().manual_seed(3)
    real = torch.randn(2, 1, 3, 3, 3, generator=generator, requires_grad=True)
    fake = torch.randn(2, 1, 3, 3, 3, generator=generator, requires_grad=True)
    torch.testing.assert_close(discriminator_loss("lsgan", real, fake),
                               0.5 * (((real - 1) ** 2).mean() + (fake ** 2).mean()), rtol=1e-6, atol=0)
    torch.testing.assert_close(generator_adversarial_loss("lsgan", fake), ((fake - 1) ** 2).mean(), rtol=1e-6, atol=0)
    # The gradients agree too.
    ours = torch.autograd.grad(discriminator_loss("lsgan", real, fake), (real, fake))
    formula = torch.autograd.grad(0.5 * (((real - 1) ** 2).mean() + (fake ** 2).mean()), (real, fake))
    for a, b in zip(ours, formula):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_checkpoint_folder_round_trip_and_bad_files(tmp_path: Path) -> None:
    """The checkpoint module shared by the GAN and the segmenter: exact round trip, atomic, one-line errors."""
    from MedSynthLib.training.checkpoint import read_checkpoint, write_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    folder = write_checkpoint(tmp_path / "step_0000001", 1, {"model": model}, {"optimizer": optimizer}, elapsed_s=2.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]  # no temporary folder left
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]

    other = torch.nn.Linear(3, 2)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    meta = read_checkpoint(folder, {"model": other}, {"optimizer": other_optimizer})
    assert meta["step"] == 1 and meta["elapsed_s"] == 2.5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    saved, loaded = optimizer.state_dict(), other_optimizer.state_dict()
    assert json.dumps(saved["param_groups"]) == json.dumps(loaded["param_groups"])  # (betas come back as a list)
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded["state"][index][key])), key

    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot resume the segmenter from this checkpoint") as caught:
        read_checkpoint(folder, {"model": other}, {"optimizer": other_optimizer}, what="the segmenter")
    assert "model.safetensors" in str(caught.value) and "\n" not in str(caught.value)


def test_losses_have_the_right_signs() -> None:
    ones, zeros = torch.ones(4), torch.zeros(4)
    # LSGAN: the discriminator wants real -> 1, fake -> 0; the generator wants fake -> 1.
    assert discriminator_loss("lsgan", ones, zeros) == 0
    assert discriminator_loss("lsgan", zeros, ones) == pytest.approx(1.0)
    assert generator_adversarial_loss("lsgan", ones) == 0
    assert generator_adversarial_loss("lsgan", zeros) == pytest.approx(1.0)
    # Hinge: zero once real >= 1 and fake <= -1; the generator loss falls as the fake score rises.
    assert discriminator_loss("hinge", 2 * ones, -2 * ones) == 0
    assert discriminator_loss("hinge", zeros, zeros) == pytest.approx(2.0)
    assert discriminator_loss("hinge", -ones, ones) == pytest.approx(4.0)
    assert generator_adversarial_loss("hinge", ones) < generator_adversarial_loss("hinge", zeros)
    assert generator_adversarial_loss("hinge", ones) == pytest.approx(-1.0)
    # Gradients push the right way.
    fake = torch.zeros(3, requires_grad=True)
    generator_adversarial_loss("hinge", fake).backward()
    assert (fake.grad < 0).all()  # descending the loss raises the fake score
    real = torch.zeros(3, requires_grad=True)
    fake = torch.zeros(3, requires_grad=True)
    discriminator_loss("lsgan", real, fake).backward()
    assert (real.grad < 0).all()  # raises real scores
    assert (fake.grad == 0).all()  # fake already at its target 0


def test_train_config_json() -> None:
    config = TrainConfig.from_json(MICRO)
    assert config.network == NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=1, disc_channels=4,
                                           disc_layers=2)
    assert TrainConfig.from_json(config.to_json()) == config
    assert json.loads(json.dumps(config.to_json())) == config.to_json()

    with pytest.raises(InputError, match=r"unknown training options \['learning_rate'\]"):
        TrainConfig.from_json(dict(MICRO, learning_rate=1e-3), "cfg.json")
    with pytest.raises(InputError, match="unknown network options"):
        TrainConfig.from_json(dict(MICRO, network=dict(TINY_NETWORK, chanels=[4, 8])), "cfg.json")
    with pytest.raises(InputError, match="patch_size 20 is not a multiple of 8"):
        TrainConfig.from_json(dict(MICRO, patch_size=20, network=dict(TINY_NETWORK, channels=[4, 8, 8, 8],
                                                                       strides=[2, 2, 2])))
    with pytest.raises(InputError, match="patch_size 15"):
        TrainConfig.from_json(dict(MICRO, patch_size=15))
    with pytest.raises(InputError, match="adversarial"):
        TrainConfig.from_json(dict(MICRO, adversarial="wgan"))
    with pytest.raises(InputError,
                       match=r"normalization must be one of \['percentile', 'healthy_zscore', 'tissue_zscore'\]"):
        TrainConfig.from_json(dict(MICRO, normalization="minmax"), "cfg.json")
    with pytest.raises(InputError) as caught:
        TrainConfig.from_json({"bogus": 1}, "cfg.json")
    assert str(caught.value).startswith("cfg.json: ")


def test_brain_l1_ignores_the_output_outside_the_brain() -> None:
    from MedSynthLib.training.divergence import masked_l1
    from MedSynthLib.training.train import loss_region, paint_into_real

    rng = torch.Generator().manual_seed(3)
    labels = torch.zeros((2, 8, 8, 8), dtype=torch.long)
    labels[:, 2:6, 1:7, 3:8] = torch.randint(1, 7, (2, 4, 6, 5), generator=rng)
    real = torch.rand((2, 4, 8, 8, 8), generator=rng) * 2 - 1
    real[(labels == 0).unsqueeze(1).expand_as(real)] = -1.0
    fake = torch.rand((2, 4, 8, 8, 8), generator=rng, requires_grad=True)

    brain = loss_region("brain", labels, None)
    assert brain.shape == (2, 1, 8, 8, 8) and torch.equal(brain[:, 0].bool(), labels > 0)
    assert loss_region("patch", labels, None) is None
    inpaint = (torch.rand((2, 1, 8, 8, 8), generator=rng) > 0.5).float()
    assert loss_region("brain", labels, inpaint) is inpaint  # an inpainting run counts its region only

    painted = paint_into_real(fake, real, brain)
    outside = (labels == 0).unsqueeze(1).expand_as(real)
    assert torch.equal(painted[outside], real[outside])  # what the discriminator sees outside the brain
    loss = masked_l1(painted, real, brain)
    expected = (fake - real).abs()[~outside].mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert fake.grad[outside].abs().max() == 0 and fake.grad[~outside].abs().min() > 0

    # Counted over the whole patch, the background's target (-1) pulls on the output there.
    whole = masked_l1(paint_into_real(fake, real, loss_region("patch", labels, None)), real, None)
    fake.grad = None
    whole.backward()
    assert fake.grad[outside].abs().min() > 0


def test_train_counts_the_l1_in_the_brain_when_asked(brats_data: Path, tmp_path: Path, monkeypatch) -> None:
    import MedSynthLib.training.train as train_module

    seen: list[torch.Tensor | None] = []
    original = train_module.masked_l1

    def recording(prediction, real, region=None):
        seen.append(None if region is None else region.detach().clone())
        return original(prediction, real, region)

    monkeypatch.setattr(train_module, "masked_l1", recording)
    for l1_region in ("brain", "patch"):
        seen.clear()
        run = tmp_path / l1_region
        train_here(brats_data, run, write_config(tmp_path / f"{l1_region}.json", steps=2, checkpoint_every=2,
                                                 val_every=1000, l1_region=l1_region))
        assert json.loads((run / "train_config.json").read_text())["config"]["l1_region"] == l1_region
        assert len(seen) == 2
        if l1_region == "patch":
            assert seen == [None, None]
        else:
            for region in seen:  # the patch's brain: some of it, not all of it, 0/1
                assert set(region.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(InputError, match=r"l1_region must be one of \['patch', 'brain'\], not 'skull'"):
        TrainConfig.from_json(dict(MICRO, l1_region="skull"), "cfg.json")


def test_the_rim_weight_weights_the_brains_outermost_layer_only() -> None:
    """``rim_weight`` multiplies the L1 weight of the brain's outermost voxel layer (face neighbours, as
    ``image_checks.outermost_layer``); a patch's own faces are not the brain's border."""
    from scipy import ndimage

    from MedSynthLib.evaluation.image_checks import outermost_layer
    from MedSynthLib.training.train import loss_region, loss_weights, outermost_layer_torch

    rng = np.random.default_rng(4)
    blob = ndimage.gaussian_filter(rng.normal(size=(20, 22, 18)), 3) > 0
    blob[[0, -1]] = False
    blob[:, [0, -1]] = False
    blob[:, :, [0, -1]] = False
    labels = torch.from_numpy(np.where(blob, 3, 0)[None].astype(np.int64))
    rim = outermost_layer_torch(torch.from_numpy(blob)[None, None])
    assert np.array_equal(rim[0, 0].numpy().astype(bool), outermost_layer(blob))
    assert not outermost_layer_torch(torch.ones((1, 1, 6, 6, 6), dtype=torch.bool)).any()  # whole patch brain

    counted = loss_region("brain", labels, None)
    assert loss_weights(counted, labels, 1.0) is counted
    weights = loss_weights(counted, labels, 10.0)[0, 0].numpy()
    assert set(np.unique(weights[outermost_layer(blob)])) == {10.0}
    assert set(np.unique(weights[blob & ~outermost_layer(blob)])) == {1.0} and not weights[~blob].any()


def test_a_rim_weight_needs_the_brain_only_l1() -> None:
    with pytest.raises(InputError, match="rim_weight .* needs l1_region 'brain', not 'patch'"):
        TrainConfig.from_json(dict(MICRO, rim_weight=5.0), "cfg.json")
    with pytest.raises(InputError, match="rim_weight"):
        TrainConfig.from_json(dict(MICRO, l1_region="brain", rim_weight=0.5), "cfg.json")
    assert TrainConfig.from_json(dict(MICRO, l1_region="brain", rim_weight=5.0), "cfg.json").rim_weight == 5.0


def test_the_last_step_validates_the_held_out_cases_once(brats_data: Path, tmp_path: Path, monkeypatch) -> None:
    """The end of a run synthesised every held-out case twice (the step's validation, then the model record's):
    on a GPU machine the second pass of nine whole brains outlasted the time left for it."""
    import MedSynthLib.training.train as train_module

    calls: list[tuple[int, bool, bool]] = []
    original = train_module.validate

    def counting(generator, network, volumes, device, precision, run_dir, step, montage=True, detailed=False):
        calls.append((step, montage, detailed))
        return original(generator, network, volumes, device, precision, run_dir, step, montage, detailed)

    monkeypatch.setattr(train_module, "validate", counting)
    run = tmp_path / "run"
    train_here(brats_data, run, write_config(tmp_path / "micro.json", steps=4, checkpoint_every=2, val_every=2))
    assert calls == [(2, True, False), (4, True, True)]
    assert sorted(p.name for p in (run / "montages").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    record = json.loads((run / "model" / "config.json").read_text())["validation"]
    assert record["per_case"] and {"brain_ssim", "brain_psnr"} <= set(record)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/brain_ssim")] == [2, 4]


def test_train_with_healthy_tissue_zscore(brats_data: Path, tmp_path: Path) -> None:
    """``normalization: healthy_zscore`` trains on its own cache and the model maps back with it."""
    from MedSynthLib.cases.anatomy import derive_label_map
    from MedSynthLib.cases.readers import read_case
    from MedSynthLib.schema.labels import Label
    from MedSynthLib.synthesis.inference import to_scanner_units
    from MedSynthLib.synthesis.normalize import HealthyTissueZScore, signal_floor_z

    cache, run = tmp_path / "cache", tmp_path / "run"
    config = write_config(tmp_path / "z.json", steps=2, checkpoint_every=2, val_every=2,
                          normalization="healthy_zscore")
    train_here(brats_data, run, config, "--cache", str(cache))
    assert sorted(p.name.split("-", 1)[1] for p in cache.glob("*.npz")) == ["healthy_zscore12.npz"] * 3
    intensity = json.loads((run / "model" / "config.json").read_text())["intensity"]

    # The model's statistics are the mean of the two training cases' healthy-tissue fits.
    fits, floors_z = [], []
    for case_id in CASE_IDS[:2]:
        case = read_case(brats_data / case_id, require_segmentation=True)
        labels = derive_label_map(case).array
        healthy = (labels >= Label.CSF) & (labels <= Label.WM)
        fit = HealthyTissueZScore.fit(case.images["t1"], healthy)
        fits.append(fit)
        floors_z.append(signal_floor_z(fit.forward(case.images["t1"], labels > 0), labels > 0, fit))
    assert intensity["t1"]["kind"] == "healthy_zscore"
    mean, std = np.mean([f.mean for f in fits]), np.mean([f.std for f in fits])
    assert intensity["t1"]["mean"] == pytest.approx(mean, rel=1e-6)
    assert intensity["t1"]["std"] == pytest.approx(std, rel=1e-6)
    # Its floor: the median of the cases' darkest signal (the cache holds float16 images: 0.01 z).
    assert intensity["t1"]["floor"] == pytest.approx(mean + np.median(floors_z) * std, abs=0.01 * std)

    # 0 in the network's space is the mean healthy tissue, in scanner units; background stays 0.
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = Label.WM
    images = to_scanner_units(np.zeros((4, 4, 4, 4), np.float32), labels, intensity,
                              ("t1", "t1ce", "t2", "flair"))
    assert images["t1"][1, 1, 1] == pytest.approx(intensity["t1"]["mean"], rel=1e-5)
    assert images["t1"][0, 0, 0] == 0.0
    darkest = to_scanner_units(np.full((4, 4, 4, 4), -1.0, np.float32), labels, intensity,
                               ("t1", "t1ce", "t2", "flair"))
    assert darkest["t1"][1, 1, 1] == pytest.approx(intensity["t1"]["floor"], rel=1e-5) and darkest["t1"][1, 1, 1] > 0


def test_init_may_switch_on_antialiasing(brats_data: Path, base_model: Path, tmp_path: Path) -> None:
    """The blur has no parameters: a model without it starts a run with it; other changes are refused."""
    base = base_model
    frozen = write_config(tmp_path / "aa.json", steps=2, checkpoint_every=2, val_every=1000, lr=0.0,
                          network=dict(TINY_NETWORK, antialias=True))
    tuned = tmp_path / "tuned"
    train_here(brats_data, tuned, frozen, "--init", str(base / "model"))
    before = load_tensors(base / "model" / "weights.safetensors")
    after = load_tensors(tuned / "model" / "weights.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    assert json.loads((tuned / "model" / "config.json").read_text())["network"]["antialias"] is True


def test_patch_sampler_is_a_function_of_seed_step_rank(brats_data: Path) -> None:
    from MedSynthLib.training.data import PatchSampler, find_case_folders, prepare_volume

    folders = find_case_folders(brats_data)
    assert [f.name for f in folders] == list(CASE_IDS)
    volumes = [prepare_volume(folders[0], None)]
    sampler = PatchSampler(16)
    labels, images = sampler.sample(volumes, 3, 7, 0, 2)
    assert labels.shape == (2, 16, 16, 16) and labels.dtype == torch.int64
    assert images.shape == (2, 4, 16, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert int(labels.min()) >= 0 and int(labels.max()) <= 6
    again = sampler.sample(volumes, 3, 7, 0, 2)
    assert torch.equal(labels, again[0]) and torch.equal(images, again[1])
    other = sampler.sample(volumes, 3, 7, 1, 2)  # another rank draws other patches
    assert not torch.equal(images, other[1])


def test_patch_sampler_augments_on_the_device_it_is_given(brats_data: Path) -> None:
    """On a GPU the crop's resampling runs there: every tensor of the augmentation follows the device.

    The meta device stands for a GPU: an operation mixing a CPU tensor into it raises, as CUDA does.
    """
    from MedSynthLib.training.data import PatchSampler, find_case_folders, prepare_volume

    volumes = [prepare_volume(find_case_folders(brats_data)[0], None)]
    sampler = PatchSampler(16)
    labels, images = sampler.sample(volumes, 3, 7, 0, 2, torch.device("meta"))
    assert labels.device.type == images.device.type == "meta"
    assert labels.shape == (2, 16, 16, 16) and images.shape == (2, 4, 16, 16, 16)
    on_cpu = sampler.sample(volumes, 3, 7, 0, 2, "cpu")
    default = sampler.sample(volumes, 3, 7, 0, 2)
    assert torch.equal(on_cpu[0], default[0]) and torch.equal(on_cpu[1], default[1])


@pytest.mark.parametrize("brain_only", [False, True])
def test_a_rotated_patch_keeps_the_brains_border_out_of_the_background(brain_only: bool) -> None:
    """A rotated or scaled patch: every voxel its (nearest-neighbour) label map calls brain keeps a brain value.

    The phantom's brain is one value (0.5, normalised); the background is -1. Interpolating the images with the
    background made the brain's outermost layer a dark target (as low as -0.25 here) that the shipped models learnt
    as a dark rim; ``brain_only_interpolation`` resamples from brain voxels only.
    """
    from MedSynthLib.training.data import _random_affine

    k, j, i = np.indices((24, 24, 24))
    brain = (k - 11.5) ** 2 + (j - 12) ** 2 / 1.4 + (i - 12.5) ** 2 < 80
    labels = torch.from_numpy(np.where(brain, 3, 0).astype(np.int64))
    images = torch.from_numpy(np.where(brain, 0.5, -1.0).astype(np.float32)[None].repeat(4, 0))
    worst = []
    for draw in range(6):
        lab, img = _random_affine(labels, images, np.random.default_rng(draw), 10.0, 0.1, brain_only)
        inside = lab > 0
        assert inside.sum() > 0.5 * brain.sum() and img.shape == images.shape
        worst.append(float(img[:, inside].min()))
        if brain_only:
            assert torch.all(img[:, ~inside] == -1.0)
    if brain_only:
        assert min(worst) > 0.5 - 1e-4, worst
    else:  # the defect this option removes, measured on the same draws
        assert min(worst) < 0.0, worst


def test_brain_only_interpolation_is_read_from_the_config_and_off_by_default() -> None:
    config = TrainConfig.from_json(dict(MICRO, brain_only_interpolation=True), "cfg.json")
    assert config.brain_only_interpolation is True
    assert TrainConfig.from_json(dict(MICRO), "cfg.json").brain_only_interpolation is False


# --- fine-tuning from a model ---------------------------------------------------------------------


def test_init_starts_from_the_model_weights(brats_data: Path, base_model: Path, tmp_path: Path) -> None:
    base = base_model
    # With a learning rate of 0 the fine-tuned generator must be exactly the starting one.
    frozen = write_config(tmp_path / "frozen.json", steps=2, checkpoint_every=2, val_every=1000, lr=0.0, seed=7)
    tuned = tmp_path / "tuned"
    train_here(brats_data, tuned, frozen, "--init", str(base / "model"))
    before = load_tensors(base / "model" / "weights.safetensors")
    after = load_tensors(tuned / "model" / "weights.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = json.loads((tuned / "model" / "config.json").read_text())["training"]["init_from"]
    base_config = json.loads((base / "model" / "config.json").read_text())
    assert record["sha256"] == base_config["weights_sha256"]
    assert record["training"] == base_config["training"]["commands"]
    # Without --init the same frozen config starts elsewhere (a fresh seed-7 network).
    fresh = tmp_path / "fresh"
    train_here(brats_data, fresh, frozen)
    other = load_tensors(fresh / "model" / "weights.safetensors")
    assert not all(torch.equal(before[k], other[k]) for k in before)
    assert json.loads((fresh / "model" / "config.json").read_text())["training"]["init_from"] is None


def test_init_with_another_network_is_refused(brats_data: Path, base_model: Path, tmp_path: Path, capsys) -> None:
    base = base_model
    wider = write_config(tmp_path / "wider.json", network=dict(TINY_NETWORK, channels=[8, 16]))
    run = tmp_path / "run"
    assert main(["train", "--data", str(brats_data), "-o", str(run), "--config", str(wider), "--device", "cpu",
                 "--init", str(base / "model")]) == 2
    assert "network" in _one_error_line(capsys)
    assert not run.exists()
    assert main(["train", "--data", str(brats_data), "-o", str(run), "--config", str(wider), "--device", "cpu",
                 "--init", str(tmp_path / "no_such_model")]) == 2
    assert "no_such_model" in _one_error_line(capsys)
    assert not run.exists()


def test_a_run_that_learns_nothing_stops_with_one_clear_error(brats_data: Path, tmp_path: Path) -> None:
    """A generator that never learns (lr 0 from random weights: a stand-in for a GAN that failed from its first
    steps) is stopped once its mean L1 over the window is above painting each patch with its own mean;
    nothing is exported."""
    config = TrainConfig.from_json(dict(MICRO, lr=0.0, divergence_window=2))
    run = tmp_path / "run"
    with pytest.raises(MedSynthError, match="the generator has not learned: over steps 3-4 its mean L1"):
        train(brats_data, run, config, device="cpu", progress=False, cache_dir=training_cache_of(brats_data))
    assert not (run / "model").exists()


def test_the_divergence_check_can_be_turned_off(brats_data: Path, tmp_path: Path) -> None:
    config = TrainConfig.from_json(dict(MICRO, lr=0.0, divergence_window=0, val_every=100))
    model = train(brats_data, tmp_path / "run", config, device="cpu", progress=False,
                  cache_dir=training_cache_of(brats_data))
    assert (model / "weights.safetensors").exists()


def test_the_interruption_message_names_the_step_a_resume_continues_from(tmp_path):
    """It said 'interrupted at step 59' after step 60's checkpoint, and 'continues from the last checkpoint'
    when there was none."""
    import json

    from MedSynthLib.training.train import _interrupted_message

    assert "starts again from step 0" in _interrupted_message(tmp_path, 200)
    (tmp_path / "checkpoints" / "step_0000060").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": 60, "path": "step_0000060"}))
    message = _interrupted_message(tmp_path, 200)
    assert "holds step 60 of 200" in message and "--resume" in message


# --- resume: what a resume keeps and what it refuses ----------------------------------------------


def resume_args(data: Path, run: Path, *extra: str) -> list[str]:
    """``train --resume`` without --config (the run's record holds it)."""
    return ["train", "--data", str(data), "-o", str(run), "--device", "cpu", "--cache",
            str(training_cache_of(data)), "--resume", *extra]


def rewind(run: Path) -> Path:
    """Make a finished 4-step run look interrupted after its step-2 checkpoint."""
    import shutil

    shutil.rmtree(run / "model")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "path": "step_0000002"}))
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def four_step_run(brats_data: Path, tmp_path_factory) -> Path:
    """A finished 4-step micro run (checkpoints at 2 and 4); tests copy it, never write into it."""
    root = tmp_path_factory.mktemp("four_step")
    threads = torch.get_num_threads()
    try:
        train_here(brats_data, root / "run", write_config(root / "four.json", steps=4, val_every=1000))
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_resume_of_a_complete_run_is_refused(brats_data: Path, base_model: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(base_model, tmp_path / "done")
    before = snapshot(run)
    assert main(resume_args(brats_data, run)) == 2
    line = _one_error_line(capsys)
    assert f"{run}: the run is already complete (step 2 of 2); its model is {run / 'model'}" in line
    assert snapshot(run) == before


def test_resume_of_a_complete_run_with_fewer_steps_names_the_checkpoints_step(brats_data: Path, base_model: Path,
                                                                              tmp_path: Path, capsys) -> None:
    """``--resume --steps 1`` on a run finished at step 2 said "already complete (step 2 of 2)"; what is wrong is the
    length asked for, below the checkpoint's step, which the command now says."""
    run = copy_run(base_model, tmp_path / "done")
    before = snapshot(run)
    assert main(resume_args(brats_data, run, "--steps", "1")) == 2
    assert f"{run}: --steps 1 is below the checkpoint's step 2" in _one_error_line(capsys)
    assert snapshot(run) == before


def test_resume_refuses_a_checkpoint_edited_to_a_step_past_the_runs_end(brats_data: Path, base_model: Path,
                                                                         tmp_path: Path, capsys) -> None:
    """A checkpoint made to say step 5 of a 2-step run (folder, state.json and latest.json edited together, the model
    removed) trained nothing and exported its weights as the finished model; it is refused, nothing written."""
    import json
    import shutil

    run = copy_run(base_model, tmp_path / "edited")
    shutil.rmtree(run / "model")
    checkpoints = run / "checkpoints"
    (checkpoints / "step_0000002").rename(checkpoints / "step_0000005")
    state = json.loads((checkpoints / "step_0000005" / "state.json").read_text())
    (checkpoints / "step_0000005" / "state.json").write_text(json.dumps(dict(state, step=5)))
    (checkpoints / "latest.json").write_text(json.dumps({"step": 5, "path": "step_0000005"}))
    before = snapshot(run)
    assert main(resume_args(brats_data, run)) == 2
    assert "the checkpoint's step 5 is past the run's 2 steps" in _one_error_line(capsys)
    assert snapshot(run) == before and not (run / "model").exists()


def test_output_that_is_a_file_is_one_line(brats_data: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "afile"
    target.write_text("keep")
    config = write_config(tmp_path / "micro.json")
    assert main(train_args(brats_data, target, config)) == 2
    assert str(target) in _one_error_line(capsys)
    assert target.read_text() == "keep"


def test_checkpoint_records_hashes_and_schema_and_refuses_tampering(tmp_path: Path) -> None:
    """state.json carries each weights file's sha256 and the label-schema version; a valid safetensors file
    whose values were changed, or a checkpoint of another schema, is refused in one line naming the file.

    Before, a generator.safetensors rewritten with other values resumed silently (the run went on to
    export a model from it), and nothing recorded the schema the checkpoint's network was trained on.
    """
    from safetensors.torch import load_file, save_file

    from MedSynthLib.schema.labels import SCHEMA_VERSION
    from MedSynthLib.synthesis.models import file_sha256
    from MedSynthLib.training.checkpoint import read_checkpoint, write_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    folder = write_checkpoint(tmp_path / "step_0000001", 1, {"model": model}, {"optimizer": optimizer})
    meta = json.loads((folder / "state.json").read_text())
    assert meta["label_schema_version"] == SCHEMA_VERSION
    assert meta["files_sha256"] == {name: file_sha256(folder / name)
                                    for name in ("model.safetensors", "optimizer.safetensors")}

    def load() -> None:
        other = torch.nn.Linear(3, 2)
        read_checkpoint(folder, {"model": other}, {"optimizer": torch.optim.Adam(other.parameters(), lr=1e-3)})

    load()  # untouched: loads
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v + 1.0 for k, v in weights.items()}, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="sha256") as caught:
        load()
    assert str(folder / "model.safetensors") in str(caught.value) and "\n" not in str(caught.value)

    save_file(weights, str(folder / "model.safetensors"))  # the original bytes back: loads again
    load()
    (folder / "state.json").write_text(json.dumps(dict(meta, label_schema_version=SCHEMA_VERSION + 1)))
    with pytest.raises(InputError, match=f"label schema version {SCHEMA_VERSION + 1}") as caught:
        load()
    assert str(folder / "state.json") in str(caught.value)
    for not_a_version in (True, "1", 1.0):  # equal to 1 under ==, but not the integer a checkpoint records
        (folder / "state.json").write_text(json.dumps(dict(meta, label_schema_version=not_a_version)))
        with pytest.raises(InputError, match="label_schema_version' is not an integer") as caught:
            load()
        assert str(folder / "state.json") in str(caught.value) and "\n" not in str(caught.value)


def test_resume_from_a_tampered_checkpoint_is_one_line(brats_data: Path, four_step_run: Path, tmp_path: Path,
                                                       capsys) -> None:
    """``medsynth train --resume`` on a checkpoint whose generator weights were replaced: exit 2, no model."""
    from safetensors.torch import load_file, save_file

    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    weights = run / "checkpoints" / "step_0000002" / "generator.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(weights)).items()}, str(weights))
    assert main(resume_args(brats_data, run)) == 2
    line = _one_error_line(capsys)
    assert str(weights) in line and "sha256" in line, line
    assert not (run / "model").exists()


def test_write_checkpoint_keeps_the_old_folder_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    from MedSynthLib.training import checkpoint

    net = torch.nn.Linear(2, 2)
    folder = tmp_path / "step_0000002"
    checkpoint.write_checkpoint(folder, 2, {"generator": net}, {})
    before = snapshot(folder)
    real_replace = os.replace

    def failing(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError("simulated failure")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing)
    with pytest.raises(OSError):
        checkpoint.write_checkpoint(folder, 2, {"generator": torch.nn.Linear(2, 2)}, {})
    assert snapshot(folder) == before
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    checkpoint.write_checkpoint(folder, 3, {"generator": net}, {})  # a reused name is replaced
    assert json.loads((folder / "state.json").read_text())["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002"]


def test_resume_of_a_fine_tune_needs_no_starting_model(brats_data: Path, base_model: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    """The starting model is recorded when the run begins; a resume from elsewhere reuses the record."""
    monkeypatch.chdir(base_model.parent)
    tuned = tmp_path / "tuned"
    train_here(brats_data, tuned, write_config(tmp_path / "ft.json", steps=4, val_every=1000), "--init", "base/model")
    rewind(tuned)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # "base/model" names nothing here
    assert main(resume_args(brats_data, tuned)) == 0
    record = json.loads((tuned / "model" / "config.json").read_text())["training"]["init_from"]
    base_config = json.loads((base_model / "model" / "config.json").read_text())
    assert record["sha256"] == base_config["weights_sha256"]


@pytest.mark.parametrize("extra, option", [(("--precision", "bf16"), "--precision"), (("--threads", "2"), "--threads"),
                                           (("--init", "MODEL"), "--init"), (("--config", "CONFIG"), "--config")])
def test_resume_refuses_options_that_differ_from_the_run(brats_data: Path, base_model: Path, four_step_run: Path,
                                                         tmp_path: Path, capsys, extra, option) -> None:
    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    other = write_config(tmp_path / "other.json", steps=4, val_every=1000, lr=1e-3)
    values = {"MODEL": str(base_model / "model"), "CONFIG": str(other)}
    extra = tuple(values.get(value, value) for value in extra)
    before = snapshot(run)
    assert main(resume_args(brats_data, run, *extra)) == 2
    line = _one_error_line(capsys)
    assert option in line
    assert snapshot(run) == before


def test_resume_accepts_options_equal_to_the_run(brats_data: Path, four_step_run: Path, tmp_path: Path) -> None:
    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    same = write_config(tmp_path / "same.json", steps=4, val_every=1000)
    assert main(resume_args(brats_data, run, "--config", str(same), "--precision", "fp32", "--threads", "1")) == 0
    assert (run / "model" / "weights.safetensors").exists()


def test_resume_with_other_data_is_refused(brats_data: Path, four_step_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from conftest import write_phantom_case

    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    assert json.loads((run / "train_config.json").read_text())["data"]
    before = snapshot(run)
    fewer = tmp_path / "fewer"
    for case in CASE_IDS[1:]:
        shutil.copytree(brats_data / case, fewer / case)
    assert main(resume_args(brats_data, run)[:2] + [str(fewer)] + resume_args(brats_data, run)[3:]) == 2
    line = _one_error_line(capsys)
    assert CASE_IDS[0] in line and "missing" in line
    changed = tmp_path / "changed"
    shutil.copytree(fewer, changed)
    write_phantom_case(changed, 7, CASE_IDS[0])  # the same name, other images
    assert main(resume_args(brats_data, run)[:2] + [str(changed)] + resume_args(brats_data, run)[3:]) == 2
    line = _one_error_line(capsys)
    assert CASE_IDS[0] in line and "changed" in line
    assert snapshot(run) == before

    # A run recorded before the fingerprint existed resumes as before, with a notice.
    record = json.loads((run / "train_config.json").read_text())
    del record["data"]
    (run / "train_config.json").write_text(json.dumps(record))
    assert main(resume_args(brats_data, run)) == 0
    assert "no record of its training data" in capsys.readouterr().err


def test_a_training_start_hashes_each_case_once(brats_data: Path, four_step_run: Path, tmp_path: Path,
                                                monkeypatch) -> None:
    """The data fingerprint and the prepared-volume cache share one content hash per case (it was computed twice)."""
    from MedSynthLib.training import data as training_data

    hashed: list[str] = []
    real_hash = training_data.case_files_hash

    def counting(case):
        hashed.append(Path(case.files["t1"]).parent.name)
        return real_hash(case)

    monkeypatch.setattr(training_data, "case_files_hash", counting)
    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    assert main(resume_args(brats_data, run)) == 0
    assert sorted(hashed) == sorted(CASE_IDS)


def test_gradient_clipping_bounds_the_norm_and_reports_it_before_clipping() -> None:
    from MedSynthLib.training.train import _clip_gradients

    network = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(network.parameters())
    for p in network.parameters():
        p.grad = torch.full_like(p, 10.0)
    before = float(torch.sqrt(sum((p.grad ** 2).sum() for p in network.parameters())))
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # as training runs bf16 and fp32: no loss scale
    assert _clip_gradients(scaler, optimizer, network, 5.0) == pytest.approx(before)
    after = float(torch.sqrt(sum((p.grad ** 2).sum() for p in network.parameters())))
    assert after == pytest.approx(5.0, rel=1e-4)
    # A norm below the bound is left as it is.
    assert _clip_gradients(scaler, optimizer, network, 50.0) == pytest.approx(5.0, rel=1e-4)
    assert float(torch.sqrt(sum((p.grad ** 2).sum() for p in network.parameters()))) == pytest.approx(after)


def test_a_run_with_grad_clip_clips_both_networks_every_step_and_logs_their_norms(
        brats_data: Path, tmp_path: Path, monkeypatch) -> None:
    import MedSynthLib.training.train as train_module

    calls: list[tuple[int, float]] = []
    original = train_module._clip_gradients

    def recording(scaler, optimizer, network, max_norm):
        calls.append((sum(p.numel() for p in network.parameters()), max_norm))
        return original(scaler, optimizer, network, max_norm)

    monkeypatch.setattr(train_module, "_clip_gradients", recording)
    run = tmp_path / "run"
    train_here(brats_data, run, write_config(tmp_path / "clip.json", steps=2, checkpoint_every=2, val_every=1000,
                                             grad_clip=0.5))
    assert json.loads((run / "train_config.json").read_text())["config"]["grad_clip"] == 0.5
    sizes = sorted({size for size, _ in calls})
    assert len(calls) == 4 and len(sizes) == 2 and {bound for _, bound in calls} == {0.5}  # G and D, 2 steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for name in ("grad_norm/generator", "grad_norm/discriminator"):
        assert [e.step for e in events.Scalars(name)] == [1, 2] and all(e.value > 0 for e in events.Scalars(name))
    # Off by default: the recipes of the shipped models never clip.
    calls.clear()
    train_here(brats_data, tmp_path / "plain", write_config(tmp_path / "plain.json", steps=2, checkpoint_every=2,
                                                            val_every=1000))
    assert calls == []
    with pytest.raises(InputError, match="grad_clip"):
        TrainConfig.from_json(dict(MICRO, grad_clip=-1.0), "cfg.json")


@pytest.mark.parametrize("interruption", ["KeyboardInterrupt", "Terminated"])
def test_an_interrupted_checkpoint_write_leaves_no_staging_folder(tmp_path: Path, monkeypatch,
                                                                  interruption: str) -> None:
    """Ctrl+C or SIGTERM (the CLI raises ``Terminated``, a ``KeyboardInterrupt``) while a checkpoint is being
    written: the staging folder is removed and the previous checkpoint and pointer stay whole.

    Before, a SIGTERM 14 s into ``medsynth train`` left ``checkpoints/.step_0000010.tmp/`` with 2 of its 5 files.
    """
    import safetensors.torch

    from MedSynthLib.schema.errors import Terminated
    from MedSynthLib.training.train import save_checkpoint

    torch.manual_seed(0)
    run = tmp_path / "run"
    generator, discriminator = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    save_checkpoint(run, 8, generator, discriminator, opt_g, opt_d, None)
    before = snapshot(run / "checkpoints")
    real_save = safetensors.torch.save_file
    written: list[str] = []
    error = {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": Terminated}[interruption]

    def interrupted_on_the_third(tensors, filename, *args, **kwargs):
        written.append(Path(filename).name)
        if len(written) == 3:
            raise error()
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_on_the_third)
    with pytest.raises(error):
        save_checkpoint(run, 10, generator, discriminator, opt_g, opt_d, None)
    assert len(written) == 3  # two files were in the staging folder when the interruption came
    assert not list((run / "checkpoints").glob(".*"))  # no .step_0000010.tmp (nor anything hidden) left
    assert snapshot(run / "checkpoints") == before  # step 8 and latest.json untouched
    assert json.loads((run / "checkpoints" / "latest.json").read_text()) == {"step": 8, "path": "step_0000008"}


def test_stale_staging_folders_from_a_hard_kill_are_removed(brats_data: Path, four_step_run: Path,
                                                             tmp_path: Path) -> None:
    """SIGKILL or a power loss mid-write leaves ``.step_N.tmp`` (and, mid-rename, ``.step_N.old``): writing a
    checkpoint removes such leftovers of any step, and so does a resume before its first checkpoint."""
    from MedSynthLib.training.checkpoint import read_checkpoint, write_checkpoint

    checkpoints = tmp_path / "checkpoints"
    net = torch.nn.Linear(2, 2)
    write_checkpoint(checkpoints / "step_0000008", 8, {"generator": net}, {})
    for name in (".step_0000010.tmp", ".step_0000006.old"):
        (checkpoints / name).mkdir()
        (checkpoints / name / "generator.safetensors").write_bytes(b"partial")
    (checkpoints / "notes.tmp").write_text("not ours")  # only checkpoint staging names are touched
    write_checkpoint(checkpoints / "step_0000012", 12, {"generator": net}, {})
    assert sorted(p.name for p in checkpoints.iterdir()) == ["notes.tmp", "step_0000008", "step_0000012"]

    (checkpoints / ".step_0000014.tmp").mkdir()
    read_checkpoint(checkpoints / "step_0000012", {"generator": torch.nn.Linear(2, 2)}, {})
    assert not (checkpoints / ".step_0000014.tmp").exists()

    # Through the CLI: a resume whose run holds a hard kill's leftover finishes without it.
    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    stale = run / "checkpoints" / ".step_0000004.tmp"
    stale.mkdir()
    (stale / "generator.safetensors").write_bytes(b"partial")
    assert main(resume_args(brats_data, run)) == 0
    assert not list((run / "checkpoints").glob(".*"))


@pytest.mark.parametrize("step, shown", [(-5, "negative (got -5)"), (True, "not an integer (got true)"),
                                         ("4", "not an integer (got '4')"), (4.5, "not an integer (got 4.5)"),
                                         (None, "not an integer (got null)"), (99, "'step' is 99, but its folder"),
                                         (3, "'step' is 3, but its folder step_0000002 holds step 2")])
def test_resume_refuses_a_hand_edited_step_before_writing_anything(brats_data: Path, four_step_run: Path,
                                                                    tmp_path: Path, capsys, step, shown) -> None:
    """A checkpoint's state.json whose 'step' is not a whole number >= 0, or not the step its step_N folder
    holds: exit 2, one line naming state.json, and nothing in the run folder changed.

    Before, ``"step": -5`` with ``--steps`` rewrote train_config.json, added a tensorboard file and ended in a
    numpy traceback ("expected non-negative integer"); ``"step": true`` resumed as step 1; 99 in a 4-step run's
    step_0000002 exported step 2's weights as the finished model, and 3 trained one step instead of two.
    """
    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    state = run / "checkpoints" / "step_0000002" / "state.json"
    state.write_text(json.dumps(dict(json.loads(state.read_text()), step=step), indent=1))
    config_before = (run / "train_config.json").read_bytes()
    before = snapshot(run)
    for extra in ((), ("--steps", "6")):  # --steps: the length change that rewrote train_config.json
        assert main(resume_args(brats_data, run, *extra)) == 2
        line = _one_error_line(capsys)
        assert str(state) in line and "'step'" in line and shown in line, line
        assert (run / "train_config.json").read_bytes() == config_before
        assert snapshot(run) == before  # no new tensorboard file, no checkpoint, no model
