"""Fuzz suite: every class of bad input gets one clear line, exit status 2, and nothing written.

The hostile inputs are built by ``Testing/fuzz_inputs.py``: corrupt, truncated and
wrong-type image files, hostile headers, wrong JSON shapes for every JSON MedSynth
reads (label-map sidecars, model configs, the model registry, training and study
configs, checkpoints), hostile arguments for every subcommand, and inputs whose
sizes would exhaust memory.  The CLI runs in-process (``MedSynthLib.cli.main``,
stdout and stderr captured at the file-descriptor level, so warnings printed by
ITK's C++ code count too); the memory cases run in a child process under an
address-space limit (``RLIMIT_AS``), so a regression fails the test instead of
exhausting the machine.  An interruption case kills training before its first
checkpoint and restarts it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_volume
from fuzz_inputs import CASES, IMAGES, MEMORY_CASES, SEG, TINY_TRAIN, FuzzCase, Workspace
from MedSynthLib.cli import main

# Address-space limit of the memory cases' child process: importing torch, MONAI and MedSynth's synthesis
# reserves 1.3 GB of virtual memory (VmPeak, measured); a good tiny synthesis (the control) fits in 3 GiB,
# while every regression the issue reports asked for 5-16 GB.
CHILD_ADDRESS_SPACE = 3 << 30


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """The good inputs every case starts from (written once)."""
    import torch

    from MedSynthLib.cases.anatomy import derive_label_map
    from MedSynthLib.cases.readers import read_case
    from MedSynthLib.schema.labelmap import write_label_map
    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator, NetworkConfig
    from MedSynthLib.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("fuzz_good")
    case = root / "data" / "P"
    for modality, array in IMAGES.items():
        write_volume(array, case / f"P_{modality}.nii.gz")
    write_volume(SEG, case / "P_seg.nii.gz")
    labels = write_label_map(derive_label_map(read_case(case)), root / "labels.nii.gz")
    network = NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=1, disc_channels=4, disc_layers=2)
    torch.manual_seed(0)
    state = {k: v.detach().contiguous() for k, v in Generator(network).state_dict().items()}
    model = write_model(root / "model", state, {"name": "fuzz", "network": network.to_json(),
                                                "intensity": {m: {"low": 0.0, "high": 1000.0}
                                                              for m in MODALITY_ORDER}})
    train(root / "data", root / "run_with_checkpoint", TrainConfig.from_json(dict(TINY_TRAIN, steps=1)),
          device="cpu", progress=False, cache_dir=root / "cache")
    return {"case": case, "labels": labels, "model": model, "data": root / "data"}


@pytest.fixture()
def workspace(good, tmp_path, monkeypatch, no_shipped_models) -> Workspace:
    # An empty registry, the shipped one hidden: a case that reaches for the default model gets a clear refusal.
    models = tmp_path / "models"
    monkeypatch.setenv("MEDSYNTH_MODELS", str(models))
    return Workspace(tmp_path, good["case"], good["labels"], good["model"], good["data"])


def check_refusal(case: FuzzCase, rc: int, out: str, err: str) -> None:
    """The promise: exit 2, one ``medsynth: error:`` line naming the input, no traceback, nothing written."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit status {rc}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err[-3000:]}"
    assert lines[0].startswith("medsynth: error:") or lines[0].startswith("medsynth"), lines[0]
    assert case.named in lines[0], f"the line does not name {case.named}: {lines[0]}"
    if case.words:
        assert case.words in lines[0], f"the line does not say {case.words!r}: {lines[0]}"
    for output in case.outputs:
        assert not output.exists(), f"{output} was written"
    unchanged = getattr(case, "unchanged", None)
    if unchanged:
        now = {p: p.read_bytes() for p in unchanged if p.exists()}
        assert now == unchanged, "the run folder was changed"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_in_process(name: str, workspace: Workspace, capfd) -> None:
    case = CASES[name](workspace)
    capfd.readouterr()
    rc = main([str(a) for a in case.argv])
    out, err = capfd.readouterr()
    check_refusal(case, rc, out, err)


def _child_env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(REPO / "Testing"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


# One child process runs every memory case in turn (one torch import instead of one per case), each
# with its stdout and stderr captured at the file-descriptor level, under the address-space limit.
LIMITED_RUNNER = """
import json, os, resource, sys, tempfile, traceback
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from MedSynthLib.cli import main
results = []
for spec in json.load(open(sys.argv[2])):
    os.environ.update(spec["env"])
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            rc = main(spec["argv"])
        except BaseException as exc:
            traceback.print_exc()
            rc = repr(exc)[:200]
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        out.seek(0); err.seek(0)
        results.append({"rc": rc, "stdout": out.read().decode(errors="replace"),
                        "stderr": err.read().decode(errors="replace")})
json.dump(results, open(sys.argv[3], "w"))
"""

CONTROL = "control_good_synthesis"


@pytest.fixture(scope="module")
def memory_results(good, tmp_path_factory) -> dict[str, tuple[FuzzCase, dict]]:
    """Every memory case (and a good synthesis as the control) run in one memory-limited child."""
    root = tmp_path_factory.mktemp("fuzz_memory")
    cases: dict[str, FuzzCase] = {}
    specs = []
    for name in [*sorted(MEMORY_CASES), CONTROL]:
        folder = root / name
        folder.mkdir()
        ws = Workspace(folder, good["case"], good["labels"], good["model"], good["data"])
        if name == CONTROL:
            case = FuzzCase(["synthesize", ws.labels, "-o", ws.out, "--device", "cpu", "--model", ws.model], "")
        else:
            case = MEMORY_CASES[name](ws)
        cases[name] = case
        specs.append({"argv": [str(a) for a in case.argv], "env": {"MEDSYNTH_MODELS": str(folder / "models")}})
    (root / "specs.json").write_text(json.dumps(specs))
    proc = subprocess.run([sys.executable, "-c", LIMITED_RUNNER, str(CHILD_ADDRESS_SPACE), str(root / "specs.json"),
                           str(root / "results.json")], capture_output=True, text=True, timeout=300,
                          env=_child_env(), cwd=REPO)
    assert proc.returncode == 0, f"the memory-limited child failed:\n{proc.stderr[-3000:]}"
    results = json.loads((root / "results.json").read_text())
    return {name: (cases[name], result) for name, result in zip(cases, results)}


@pytest.mark.parametrize("name", sorted(MEMORY_CASES))
def test_sizes_refused_before_allocating(name: str, memory_results) -> None:
    """Inputs that would need more memory than the budget: refused from headers and configs."""
    case, result = memory_results[name]
    check_refusal(case, result["rc"], result["stdout"], result["stderr"])


def test_memory_limit_leaves_room_for_good_work(memory_results) -> None:
    """The control for the memory cases: a good synthesis succeeds under the same limit."""
    case, result = memory_results[CONTROL]
    assert result["rc"] == 0, result["stderr"][-3000:]
    assert (case.argv[3] / "t1.nii.gz").exists()


# --- interruptions -------------------------------------------------------------------------------------


def test_training_killed_before_first_checkpoint_restarts(good, tmp_path: Path, capfd) -> None:
    """kill -9 before the first checkpoint; ``--resume`` and a plain rerun both restart the run from step 0."""
    import shutil

    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(TINY_TRAIN, steps=2, checkpoint_every=1000, val_every=1000)))
    run = tmp_path / "run"
    args = ["train", "--data", str(good["data"]), "-o", str(run), "--config", str(config), "--device", "cpu"]
    process = subprocess.Popen([sys.executable, "-m", "MedSynthLib", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_child_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (run / "train_config.json").exists() and time.monotonic() < deadline:
            assert process.poll() is None, "training ended before it could be killed"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    assert (run / "train_config.json").exists()
    assert not (run / "checkpoints" / "latest.json").exists(), "the kill came after the first checkpoint"
    copy = Path(shutil.copytree(run, tmp_path / "run_copy"))
    for folder, extra in ((run, ["--resume"]), (copy, [])):
        argv = [a if a != str(run) else str(folder) for a in args] + extra
        capfd.readouterr()
        assert main(argv) == 0, capfd.readouterr().err[-3000:]
        assert (folder / "model" / "weights.safetensors").exists()
        assert json.loads((folder / "checkpoints" / "latest.json").read_text())["step"] == 2


def test_fuzz_case_count() -> None:
    """The suite's size, so a builder lost in a refactor is noticed (README reports these counts)."""
    assert len(CASES) >= 140 and len(MEMORY_CASES) >= 7, (len(CASES), len(MEMORY_CASES))


@pytest.mark.parametrize("damage", ["weights_nan", "weights_pickle_renamed", "model_config_intensity_nan"])
def test_models_lists_broken_models_and_register_refuses_them(damage: str, workspace: Workspace, capfd) -> None:
    """``medsynth models`` marks a NaN or pickled model BROKEN; ``--register --default`` refuses it."""
    import shutil

    case = CASES[damage](workspace)  # leaves the damaged model in workspace.tmp / "model"
    damaged = workspace.tmp / "model"
    registry = workspace.tmp / "models"
    registry.mkdir()
    shutil.copytree(damaged, registry / "bad")
    shutil.copytree(workspace.model, registry / "good")
    from MedSynthLib.synthesis.models import file_sha256

    (registry / "registry.json").write_text(json.dumps({"default": "good", "models": {
        name: {"path": name, "sha256": file_sha256(registry / name / "weights.safetensors")}
        for name in ("bad", "good")}}))
    capfd.readouterr()
    assert main(["models"]) == 2
    listing, err = capfd.readouterr()
    assert err.count("\n") == 1 and "failed verification (bad)" in err, err
    bad_block = listing.split("bad\n", 1)[1].split("good", 1)[0]
    assert "status   BROKEN" in bad_block, listing
    assert "status   ok" in listing.split("good", 1)[1], listing
    before = (registry / "registry.json").read_text()
    rc = main(["models", "--register", str(damaged), "--name", "bad2", "--default"])
    check_refusal(FuzzCase([], case.named, [registry / "bad2"]), rc, *capfd.readouterr())
    assert (registry / "registry.json").read_text() == before


@pytest.mark.parametrize("what", ["case_folder", "image_file", "label_map_folder"])
def test_unreadable_inputs_say_permission_denied(what: str, workspace: Workspace, capfd, monkeypatch) -> None:
    """A folder or file without read permission is 'permission denied', never 'not found'.

    Run as root, chmod does not stop reads, so the refusal the kernel would give any other user is
    simulated (``os.access`` and listing the folder report it).
    """
    import pathlib
    import shutil

    case = Path(shutil.copytree(workspace.case, workspace.tmp / "case"))
    labels_dir = workspace.tmp / "maps"
    labels_dir.mkdir()
    labels = Path(shutil.copy(workspace.labels, labels_dir / "labels.nii.gz"))
    target = {"case_folder": case, "image_file": case / "P_t1.nii.gz", "label_map_folder": labels_dir}[what]
    mode = target.stat().st_mode
    target.chmod(0)
    real_access, real_iterdir = os.access, pathlib.Path.iterdir

    def access(path, flags, *args, **kwargs):
        if Path(path) == target:
            return False
        return real_access(path, flags, *args, **kwargs)

    def iterdir(self):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    out = workspace.tmp / "out.nii.gz"
    argv = (["tumor", labels, "--translate", "1", "0", "0", "-o", out] if what == "label_map_folder"
            else ["labels", case, "-o", out])
    try:
        capfd.readouterr()
        rc = main([str(a) for a in argv])
        out_text, err = capfd.readouterr()
    finally:
        target.chmod(mode)
    check_refusal(FuzzCase(argv, str(target), [out], "permission denied"), rc, out_text, err)
