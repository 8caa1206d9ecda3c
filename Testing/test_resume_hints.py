"""What a cancelled command says about resuming it.

A cancelled generate run printed only ``medsynth: cancelled``, though the same command resumes it; an interrupted
training run named ``medsynth train ... --resume``, not a command that could be pasted.  (A cancelled study names
its work folder and the stages it kept: ``Testing/test_study_progress.py``.)
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from conftest import training_cache_of
from MedSynthLib.cli import main
from test_training import write_config


def _cancelled(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "medsynth: cancelled", err  # still the last line (scripts and tests read it)
    assert "Traceback" not in err
    return lines


def test_a_cancelled_generate_names_the_command_and_its_output(tmp_path: Path, monkeypatch, capsys) -> None:
    import MedSynthLib.generate.runner as runner

    def cancelled(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "generate", cancelled)
    out = tmp_path / "dataset"
    args = ["generate", "-n", "2", "--labels-from", str(tmp_path), "--layout", "nnunet", "-o", str(out), "--quiet"]
    assert main(args) == 130
    hint = _cancelled(capsys.readouterr().err)[-2]
    assert "same command" in hint and str(out) in hint, hint
    # An interrupted --overwrite puts the old dataset back: the same command starts over, it resumes nothing.
    assert main(args + ["--overwrite"]) == 130
    lines = _cancelled(capsys.readouterr().err)
    assert not any("same command" in line for line in lines), lines


def test_the_training_hint_is_the_command_to_paste(tmp_path: Path) -> None:
    from MedSynthLib.training.train import _interrupted_message

    run = tmp_path / "my run"
    (run / "checkpoints" / "step_0000060").mkdir(parents=True)
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 60, "path": "step_0000060"}))
    data = [Path("cases a"), Path("more")]
    message = _interrupted_message(run, 200, data=data)
    assert "holds step 60 of 200" in message
    command = f"medsynth train --data 'cases a' more -o '{run}' --resume"
    assert command in [line.strip() for line in message.splitlines()], message
    message = _interrupted_message(run, 200, data=data, cache=Path("c"))
    assert (f"medsynth train --data 'cases a' more -o '{run}' --cache c --resume"
            in [line.strip() for line in message.splitlines()]), message
    message = _interrupted_message(run, 200, data=data, distributed=True)
    assert "the same torchrun command" in message and "--resume" in message
    assert "train --data 'cases a' more -o" in message, message


def test_an_interrupted_run_resumes_with_the_command_it_prints(phantom_brats: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    import MedSynthLib.training.train as train_module

    write_json = train_module.write_json

    def interrupt_after_the_first_checkpoint(data, path, **kwargs):
        result = write_json(data, path, **kwargs)
        if Path(path).name == "latest.json":
            raise KeyboardInterrupt
        return result

    run, cache = tmp_path / "run", training_cache_of(phantom_brats)
    config = write_config(tmp_path / "micro.json", steps=4, val_every=1000)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "write_json", interrupt_after_the_first_checkpoint)
        assert main(["train", "--data", str(phantom_brats), "-o", str(run), "--config", str(config), "--device",
                     "cpu", "--cache", str(cache)]) == 130
    lines = _cancelled(capsys.readouterr().err)
    commands = [line.strip() for line in lines if line.strip().startswith("medsynth train ")]
    assert len(commands) == 1, lines
    argv = shlex.split(commands[0])
    assert argv[:2] == ["medsynth", "train"] and argv[-1] == "--resume"
    assert main(argv[1:]) == 0, capsys.readouterr().err
    assert (run / "model" / "weights.safetensors").is_file()
