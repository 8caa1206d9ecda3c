"""``medsynth generate`` that fails before completing any case leaves no run file behind.

The run file (``OUT/generate.json``) is written before the first case: a run that then failed (the model failing to
load in a worker, an out-of-memory error, Ctrl+C) left it, and the corrected command was refused as a run "with other
settings", which only ``--overwrite`` got past.  A run that completed a case keeps it, and resumes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from MedSynthLib.cli import main
from MedSynthLib.generate import runner
from test_generate import _argv, _records, gen_data  # noqa: F401 - gen_data: the phantom sources


@pytest.fixture
def broken_model(gen_data, tmp_path, monkeypatch) -> Path:  # noqa: F811
    """A copy of the tiny model that passes the up-front checks, then changes on disk before the workers load it
    (another process rewriting it): loading it in a worker fails."""
    model = Path(shutil.copytree(gen_data["model"], tmp_path / "model"))
    real = runner._say_emulated_bf16

    def then_change(*args):
        real(*args)
        for path in model.iterdir():
            if path.suffix == ".safetensors":
                path.write_bytes(path.read_bytes()[:-8] + bytes(8))

    monkeypatch.setattr(runner, "_say_emulated_bf16", then_change)
    return model


def _with_model(argv: list[str], model: Path) -> list[str]:
    argv = list(argv)
    argv[argv.index("--model") + 1] = str(model)
    return argv


def _fails(argv: list[str]) -> bool:
    """Whether the command failed (an exit status, or an error the CLI does not catch)."""
    try:
        return main(argv) != 0
    except Exception:  # noqa: BLE001 - a worker's failure as it comes
        return True


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_model_failing_to_load_leaves_no_run_file(gen_data, broken_model, tmp_path, workers):  # noqa: F811
    out = tmp_path / "out"
    argv = _argv(gen_data, out, "--workers", workers, n=2)
    assert _fails(_with_model(argv, broken_model))
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert main(argv) == 0  # the corrected command, without --overwrite
    assert sorted(_records(out)) == ["BrainTumourSynth_00000", "BrainTumourSynth_00001"]


def test_a_failure_in_an_existing_empty_folder_keeps_the_folder(gen_data, broken_model, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    assert _fails(_with_model(_argv(gen_data, out, n=1), broken_model))
    assert out.is_dir() and list(out.iterdir()) == []
    assert main(_argv(gen_data, out, n=1)) == 0


def test_ctrl_c_before_the_first_case_leaves_no_run_file(gen_data, tmp_path, monkeypatch):  # noqa: F811
    def interrupted(index):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_run_case", interrupted)
    out = tmp_path / "out"
    assert main(_argv(gen_data, out, n=1)) == 130
    assert not out.exists()


def test_a_case_written_but_not_recorded_is_removed_with_the_run_file(gen_data, tmp_path, monkeypatch):  # noqa: F811
    """Cut between a case's files moved into place and its record: the case is not complete, its files go too."""
    original = runner.write_json if hasattr(runner, "write_json") else None
    assert original is None  # _run_case imports write_json itself: patch it where it lives
    from MedSynthLib.schema import volume_io

    real = volume_io.write_json

    def failing(data, path, *args, **kwargs):
        if Path(path).parent.name == "provenance":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(data, path, *args, **kwargs)

    monkeypatch.setattr(volume_io, "write_json", failing)
    out = tmp_path / "out"
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main(_argv(gen_data, out, n=1))
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_a_run_that_completed_a_case_keeps_its_run_file_and_resumes(gen_data, tmp_path, monkeypatch):  # noqa: F811
    real = runner._run_case
    calls = []

    def second_fails(index):
        calls.append(index)
        if len(calls) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(index)

    monkeypatch.setattr(runner, "_run_case", second_fails)
    out = tmp_path / "out"
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main(_argv(gen_data, out, n=3))
    assert (out / "generate.json").is_file()
    first = _records(out)
    assert sorted(first) == ["BrainTumourSynth_00000"]
    monkeypatch.setattr(runner, "_run_case", real)
    assert main(_argv(gen_data, out, n=3)) == 0
    done = _records(out)
    assert sorted(done) == [f"BrainTumourSynth_0000{i}" for i in range(3)]
    assert done["BrainTumourSynth_00000"] == first["BrainTumourSynth_00000"]  # resumed, not redone


def test_a_failed_resume_never_removes_the_run_file(gen_data, tmp_path, monkeypatch):  # noqa: F811
    """A rerun of a run that made no case yet (its run file written by an older MedSynth, or a killed run) did not
    create the run file: failing again, it leaves it."""
    def failing(index):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    out = tmp_path / "out"
    monkeypatch.setattr(runner, "_run_case", failing)
    monkeypatch.setattr(runner, "_undo_new_run", lambda *args: None)  # as if killed: the run file stays
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main(_argv(gen_data, out, n=1))
    before = (out / "generate.json").read_bytes()
    monkeypatch.undo()
    monkeypatch.setattr(runner, "_run_case", failing)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main(_argv(gen_data, out, n=1))
    assert (out / "generate.json").read_bytes() == before


def test_the_creating_rank_removes_the_run_file_only_once_the_other_ranks_stopped(gen_data, tmp_path,
                                                                                    monkeypatch):  # noqa: F811
    """Under torchrun the other ranks resume the run file one rank wrote: they hold it (a shared lock) while they
    run, and the rank that wrote it, failing, waits for them; a case one of them completes keeps the run."""
    def failing(index):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner, "_run_case", failing)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    real_claim = runner._claim_run
    for other_completes in (False, True):
        out = tmp_path / f"out{other_completes}"
        held = {}

        def claim_and_join(out_, *args):
            result = real_claim(out_, *args)
            held["fd"] = fd = os.open(out_ / "generate.json", os.O_RDONLY)  # rank 1 joins the run
            fcntl.flock(fd, fcntl.LOCK_SH)
            return result

        def rank_1():
            while "fd" not in held:
                time.sleep(0.05)
            time.sleep(1.5)  # rank 0 fails meanwhile, and waits
            if other_completes:
                (out / "provenance").mkdir(exist_ok=True)
                (out / "provenance" / "BrainTumourSynth_00001.json").write_text("{}")
            else:
                time.sleep(0.5)
            os.close(held["fd"])  # rank 1 stops

        monkeypatch.setattr(runner, "_claim_run", claim_and_join)
        thread = threading.Thread(target=rank_1)
        thread.start()
        try:
            with pytest.raises(torch.cuda.OutOfMemoryError):
                main(_argv(gen_data, out, n=2))
        finally:
            thread.join()
        assert (out / "generate.json").exists() == other_completes
        assert out.exists() == other_completes
