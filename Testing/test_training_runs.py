"""`medsynth train` as a run: one run per run folder, restarts and resumes that keep the record, progress.

Three phantom cases, the tiny network of test_training.py (channels 4-8, 16^3 patches), one thread; each run is a
few steps, most of its time start-up.  Runs go through ``main()`` in this process, on the session's shared cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import PHANTOM_BRATS_IDS, training_cache_of
from MedSynthLib.cli import main
from MedSynthLib.schema.outputs import lock_path, output_lock

TINY_NETWORK = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "disc_channels": 4, "disc_layers": 2}
MICRO = {"network": TINY_NETWORK, "patch_size": 16, "steps": 4, "checkpoint_every": 2, "val_every": 1000,
         "log_every": 1, "threads": 1, "val_cases": [PHANTOM_BRATS_IDS[2]], "precision": "fp32"}

pytestmark = pytest.mark.usefixtures("torch_threads")  # in-process runs set torch's thread count


def write_config(path: Path, **changes) -> Path:
    path.write_text(json.dumps(dict(MICRO, **changes), indent=1))
    return path


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "-o", str(run), "--device", "cpu", "--cache", str(training_cache_of(data)),
            *extra]


def run_main(args: list[str]) -> int:
    return main(args + ["--command-line", "medsynth " + " ".join(args)])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("medsynth: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def model_record(run: Path) -> dict:
    return json.loads((run / "model" / "config.json").read_text())


# --- one run per run folder ---------------------------------------------------------------------


def test_a_run_folder_held_by_another_run_is_refused(phantom_brats: Path, tmp_path: Path, capsys) -> None:
    """Two runs on one -o both went ahead: one died with a SafetensorError traceback, the folder ended with one run's
    train_config.json beside the other's checkpoints and model. The second is now refused in one line."""
    config = write_config(tmp_path / "micro.json")
    run = tmp_path / "run"
    with output_lock(run.resolve(), wait=False):  # another run holds the folder
        assert run_main(train_args(phantom_brats, run, "--config", str(config))) == 2
        line = one_error_line(capsys)
        assert str(run) in line and "another medsynth train run" in line
        assert not run.exists()
    # The same for a resume of an existing run: nothing of it changes.
    assert run_main(train_args(phantom_brats, run, "--config", str(config), "--steps", "2")) == 0
    before = snapshot(run)
    with output_lock(run.resolve(), wait=False):
        assert run_main(train_args(phantom_brats, run, "--resume", "--steps", "4")) == 2
        assert "another medsynth train run" in one_error_line(capsys)
    assert snapshot(run) == before


def test_the_run_holds_its_folder_from_start_to_export(phantom_brats: Path, tmp_path: Path, monkeypatch) -> None:
    """The lock is held while checkpoints are written and the model is exported, and released at the end."""
    import MedSynthLib.training.train as train_module

    run = tmp_path / "run"
    held: list[str] = []

    def try_lock(what: str) -> None:
        try:
            with output_lock(run.resolve(), wait=False):
                held.append(f"{what}: free")
        except BlockingIOError:
            held.append(f"{what}: held")

    save, export = train_module.save_checkpoint, train_module.export_model
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda *args, **kwargs: try_lock("checkpoint") or save(*args, **kwargs))
    monkeypatch.setattr(train_module, "export_model",
                        lambda *args, **kwargs: try_lock("export") or export(*args, **kwargs))
    assert run_main(train_args(phantom_brats, run, "--config", str(write_config(tmp_path / "micro.json")))) == 0
    assert held == ["checkpoint: held", "checkpoint: held", "export: held"]
    assert not lock_path(run.resolve()).exists()


# --- a restart before the first checkpoint keeps its record -----------------------------------------


def _register(source: Path, name: str, root: Path) -> str:
    from MedSynthLib.synthesis.models import register_model

    return register_model(source, name, root=root, overwrite=True).sha256


def test_a_restart_before_the_first_checkpoint_keeps_the_recorded_starting_model(
        phantom_brats: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`--resume` of a run interrupted before its first checkpoint resolved `--init NAME` again: with the name now
    registered to other weights it trained from those, and rewrote the record and its original command."""
    import MedSynthLib.training.train as train_module

    registry = tmp_path / "models"
    monkeypatch.setenv("MEDSYNTH_MODELS", str(registry))
    one_step = write_config(tmp_path / "one.json", steps=1, checkpoint_every=1)
    for name, seed in (("a", 1), ("b", 2)):
        assert run_main(train_args(phantom_brats, tmp_path / name, "--config",
                                   str(write_config(tmp_path / f"{name}.json", steps=1, checkpoint_every=1,
                                                    seed=seed)))) == 0
    sha_a = _register(tmp_path / "a" / "model", "start", registry)

    # The fine-tune is interrupted before its first checkpoint.
    run = tmp_path / "tune"
    save = train_module.save_checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", interrupted)
    start_args = train_args(phantom_brats, run, "--config", str(one_step), "--init", "start")
    assert run_main(start_args) == 130
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    recorded = json.loads((run / "train_config.json").read_text())
    assert recorded["init_model"]["sha256"] == sha_a and recorded["command"] == "medsynth " + " ".join(start_args)

    # "start" now names other weights: the restart refuses in one line, writing nothing.
    sha_b = _register(tmp_path / "b" / "model", "start", registry)
    assert sha_b != sha_a
    before = snapshot(run)
    capsys.readouterr()
    assert run_main(train_args(phantom_brats, run, "--resume")) == 2
    line = one_error_line(capsys)
    assert "train_config.json" in line and sha_a[:12] in line
    assert snapshot(run) == before

    # The recorded weights registered again (under another name): the restart starts from them.
    _register(tmp_path / "a" / "model", "old", registry)
    resume_args = train_args(phantom_brats, run, "--resume")
    assert run_main(resume_args) == 0
    after = json.loads((run / "train_config.json").read_text())
    assert after["command"] == recorded["command"] and after["init_model"] == recorded["init_model"]
    training = model_record(run)["training"]
    assert training["init_from"]["sha256"] == sha_a
    assert training["commands"] == [recorded["command"], "medsynth " + " ".join(resume_args)]


def _interrupted_before_the_first_checkpoint(run_args: list[str], monkeypatch) -> None:
    """Start a run and stop it with Ctrl+C where its first checkpoint would be written."""
    import MedSynthLib.training.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(train_module, "save_checkpoint", interrupted)
        assert run_main(run_args) == 130


def test_a_restart_before_the_first_checkpoint_refuses_other_data(phantom_brats: Path, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    """`--resume` of a run interrupted before its first checkpoint did not compare --data with the cases the run
    recorded: with a case missing or another case's scans under its name it restarted on that data as the same run.
    It is now refused in one line, as a resume after a checkpoint is, and nothing of the run changes."""
    import shutil

    from conftest import write_phantom_case

    config = write_config(tmp_path / "one.json", steps=1, checkpoint_every=1)
    run = tmp_path / "run"
    _interrupted_before_the_first_checkpoint(train_args(phantom_brats, run, "--config", str(config)), monkeypatch)
    assert json.loads((run / "train_config.json").read_text())["data"]["case_sha256"]
    cache = str(training_cache_of(phantom_brats))
    fewer, swapped = tmp_path / "fewer", tmp_path / "swapped"
    for case in PHANTOM_BRATS_IDS[1:]:
        shutil.copytree(phantom_brats / case, fewer / case)
    for case in PHANTOM_BRATS_IDS:
        shutil.copytree(phantom_brats / case, swapped / case)
    shutil.rmtree(swapped / PHANTOM_BRATS_IDS[0])
    write_phantom_case(swapped, 7, PHANTOM_BRATS_IDS[0])  # another patient's scans under the recorded name
    before = snapshot(run)
    capsys.readouterr()
    first = PHANTOM_BRATS_IDS[0]
    for data, problem in ((fewer, f"missing ['{first}']"), (swapped, f"changed ['{first}']")):
        args = ["train", "--data", str(data), "-o", str(run), "--device", "cpu", "--cache", cache, "--resume"]
        assert run_main(args) == 2
        line = one_error_line(capsys)
        assert "train_config.json" in line and "not the data this run was trained on" in line and problem in line
        assert snapshot(run) == before
    # The recorded data: the restart goes ahead.
    assert run_main(train_args(phantom_brats, run, "--resume")) == 0
    assert (run / "model" / "config.json").is_file()


# --- a resume after the final validation's interruption --------------------------------------------


def test_a_run_interrupted_in_its_final_validation_resumes_to_the_same_record(
        phantom_brats: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Interrupted after its last checkpoint, in the final validation, a resumed run exported empty final_losses and
    no final montage. It now exports what the uninterrupted run does (the validation's progress shown per case)."""
    import MedSynthLib.training.train as train_module

    config = write_config(tmp_path / "micro.json", val_cases=list(PHANTOM_BRATS_IDS[1:]))
    assert run_main(train_args(phantom_brats, tmp_path / "A", "--config", str(config))) == 0
    shown = capsys.readouterr().err
    # a bar over the 2 held-out cases (drawn at its start; fast cases skip its redraws)
    assert re.search(r"validation:\s+\d+%\|[^|]*\| [0-2]/2 ", shown), shown

    validate = train_module.validate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "validate", interrupted)
    run = tmp_path / "B"
    assert run_main(train_args(phantom_brats, run, "--config", str(config))) == 130
    assert "holds step 4 of 4" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "validate", validate)
    assert run_main(train_args(phantom_brats, run, "--resume")) == 0

    a, b = model_record(tmp_path / "A"), model_record(run)
    assert b["training"]["final_losses"] and b["training"]["final_losses"] == a["training"]["final_losses"]
    assert b["validation"] == a["validation"]
    assert b["weights_sha256"] == a["weights_sha256"]
    assert sorted(p.name for p in (run / "montages").glob("*.png")) == ["step_0000004.png"]


def _scalars(run: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars whose tag starts with ``prefix``: tag -> [(step, value)] as TensorBoard shows
    them (a resumed session's purge of later steps applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag.startswith(prefix)}


@pytest.mark.parametrize("interrupted_in, logged_before", [("validate", False), ("fit_export_appearance", True)])
def test_a_resumed_final_validation_logs_its_tensorboard_scalars_once(phantom_brats: Path, tmp_path: Path,
                                                                       monkeypatch, interrupted_in: str,
                                                                       logged_before: bool) -> None:
    """Interrupted in its final validation, a resumed run validated again but wrote no val/* scalars (its TensorBoard
    lacked the last step's validation); interrupted after that validation was logged (while the model was exported),
    a resumed run validated again and logged every val/* scalar a second time. Each is now logged once."""
    import MedSynthLib.training.train as train_module

    config = write_config(tmp_path / "micro.json")
    assert run_main(train_args(phantom_brats, tmp_path / "A", "--config", str(config))) == 0
    expected = _scalars(tmp_path / "A", "val/")
    assert expected and all([step for step, _ in points] == [4] for points in expected.values())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "B"
    with monkeypatch.context() as patched:
        patched.setattr(train_module, interrupted_in, interrupted)
        assert run_main(train_args(phantom_brats, run, "--config", str(config))) == 130
    assert _scalars(run, "val/") == (expected if logged_before else {})
    assert run_main(train_args(phantom_brats, run, "--resume")) == 0
    assert _scalars(run, "val/") == expected
    # The training scalars too: the resumed session kept the last step's, logged before its checkpoint.
    assert _scalars(run, "loss/") == _scalars(tmp_path / "A", "loss/")
    assert {tag: [step for step, _ in points] for tag, points in _scalars(run, "time/").items()} == \
        {tag: [step for step, _ in points] for tag, points in _scalars(tmp_path / "A", "time/").items()}
    assert model_record(run)["validation"] == model_record(tmp_path / "A")["validation"]
    assert model_record(run)["weights_sha256"] == model_record(tmp_path / "A")["weights_sha256"]


# --- the interruption message -------------------------------------------------------------------------


def test_a_sigint_while_the_checkpoint_is_recorded_names_the_checkpoint(phantom_brats: Path, tmp_path: Path,
                                                                          monkeypatch, capsys,
                                                                          sigint_as_in_a_terminal) -> None:
    """A SIGINT after step 2's folder was in place but before latest.json named it printed 'interrupted before the
    first checkpoint'. The folder and its pointer are now placed as one step: the message names step 2."""
    import MedSynthLib.training.train as train_module

    write_json = train_module.write_json
    sent: list[str] = []

    def sigint_before_the_pointer(data, path, **kwargs):
        if Path(path).name == "latest.json" and not sent:
            sent.append(Path(path).name)
            assert (Path(path).parent / "step_0000002").is_dir()
            os.kill(os.getpid(), signal.SIGINT)
        return write_json(data, path, **kwargs)

    monkeypatch.setattr(train_module, "write_json", sigint_before_the_pointer)
    run = tmp_path / "run"
    assert run_main(train_args(phantom_brats, run, "--config", str(write_config(tmp_path / "micro.json")))) == 130
    err = capsys.readouterr().err
    assert sent and "before the first checkpoint" not in err
    assert "holds step 2 of 4" in err
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 2


def test_the_message_without_a_recorded_checkpoint_says_what_there_is(tmp_path: Path) -> None:
    from MedSynthLib.training.train import _interrupted_message

    assert "before the first checkpoint" in _interrupted_message(tmp_path, 4)
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)  # in place, not yet named by latest.json
    message = _interrupted_message(tmp_path, 4)
    assert "before the first checkpoint" not in message and "latest.json" in message
    assert "starts again from step 0" in message
