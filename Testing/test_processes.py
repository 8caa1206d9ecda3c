"""Is a process alive: the one helper that the output commits and the Slicer module's worker share.

A killed run's staging folder is removed by the next run on that output only when its process is
gone; a process that exited but was not yet reaped by its parent (a zombie) is gone too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from MedSynthLib.schema.outputs import STAGE_MARK, clean_stale_staging
from MedSynthLib.schema.processes import group_pids, pid_alive

REPO = Path(__file__).resolve().parents[1]
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombie states are read from /proc")


def _zombie() -> subprocess.Popen:
    """A child that has exited and is not reaped yet (the caller reaps it with ``wait()``)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                return child
        time.sleep(0.02)
    child.kill()
    child.wait()
    pytest.fail("the child did not exit within 60 s")


def test_pid_alive_for_a_running_and_a_reaped_process():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)  # reaped: no such process (pids are not reused this fast)


@needs_proc
def test_a_zombie_is_not_alive():
    child = _zombie()
    try:
        os.kill(child.pid, 0)  # the kernel still knows the pid: a bare signal-0 probe calls it alive
        assert not pid_alive(child.pid)
    finally:
        child.wait()


@needs_proc
def test_a_zombies_staging_folder_is_removed(tmp_path):
    child = _zombie()
    try:
        stale = tmp_path / f".W{STAGE_MARK}{child.pid}-abc"
        stale.mkdir()
        live = tmp_path / f".W{STAGE_MARK}{os.getppid()}-def"  # the parent of pytest is running
        live.mkdir()
        assert clean_stale_staging(tmp_path / "W") == [stale]
        assert not stale.exists() and live.is_dir()
    finally:
        child.wait()


@needs_proc
def test_group_pids_lists_the_live_members_of_a_group():
    leader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert group_pids(leader.pid) == [leader.pid]
    finally:
        leader.kill()
        leader.wait()
    assert group_pids(leader.pid) == []


def test_the_slicer_module_uses_the_same_helpers_and_loads_nothing_heavy():
    # Slicer loads the module before the extension's Python packages are installed: with numpy
    # unimportable, the process helpers still load, and they bring only the stdlib module of
    # MedSynthLib (and its packages) with them.
    code = ("import sys; sys.modules['numpy'] = None; sys.path.insert(0, sys.argv[1]); "
            "import MedSynthSlicerLib; before = set(sys.modules); "
            "import MedSynthSlicerLib.process as p; import MedSynthLib.schema.processes as q; "
            "assert p.pid_alive is q.pid_alive and p.group_pids is q.group_pids; "
            "assert p.pid_alive(__import__('os').getpid()); "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('MedSynthLib')))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "MedSynth")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['MedSynthLib.schema.processes']"


# --- interruption during a commit ------------------------------------------------------------------


@pytest.fixture()
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in the medsynth program (a pytest-xdist worker ignores SIGINT)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_inside_signals_deferred_arrives_after_the_block(ctrl_c_raises):
    import signal

    from MedSynthLib.schema.outputs import signals_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now: it only recorded the signal
            steps.append("after the signal")
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def _sigint_at_rename(monkeypatch, nth: int) -> list:
    """``os.replace`` that sends this process SIGINT at its ``nth`` call (then renames); returns the calls."""
    import signal

    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def _old_and_new_case(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    owned = ["t1.nii.gz", "t2.nii.gz", "labels.nii.gz", "provenance.json"]
    target, stage = tmp_path / "case", tmp_path / "stage"
    for folder, text in ((target, "old"), (stage, "new")):
        folder.mkdir()
        for name in owned:
            (folder / name).write_text(text)
    return target, stage, owned


def test_ctrl_c_between_the_renames_of_an_overwrite_leaves_the_whole_new_case(tmp_path, monkeypatch, ctrl_c_raises):
    """A SIGINT at the second of four renames: every file is the new one, then the command is cancelled (it
    used to stop there, leaving new T1 and T2 beside the old labels and provenance)."""
    import MedSynthLib.schema.outputs as outputs

    target, stage, owned = _old_and_new_case(tmp_path)
    calls = _sigint_at_rename(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        outputs.commit_folder(stage, target, owned, overwrite=True)
    assert len(calls) == 4
    assert {p.name: p.read_text() for p in target.iterdir()} == {name: "new" for name in owned}


def test_ctrl_c_between_the_two_renames_of_a_model_folder_keeps_a_folder(tmp_path, monkeypatch, ctrl_c_raises):
    import MedSynthLib.schema.volume_io as volume_io

    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.safetensors").write_text("old")
    _sigint_at_rename(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        with volume_io.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "weights.safetensors").write_text("new")
    assert (target / "weights.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old copy left


def test_sigterm_takes_the_cancellation_path_of_the_medsynth_program(tmp_path, monkeypatch, capsys):
    """SIGTERM in the program: exit 143, one line, and the command's cleanups run (it ended the process at
    once, leaving staging folders of synthesize, export and train behind)."""
    import signal

    from conftest import phantom, write_volume
    import MedSynthLib.cli as cli

    images, _ = phantom()
    labels = tmp_path / "labels.nii.gz"
    write_volume(images["t1"], tmp_path / "case" / "P_t1.nii.gz")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        cli._terminate_as_cancel()
        from MedSynthLib.cases import anatomy

        def terminated_during_the_anatomy(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            raise AssertionError("SIGTERM did not stop the command")

        monkeypatch.setattr(anatomy, "segment_anatomy", terminated_during_the_anatomy)
        capsys.readouterr()
        assert cli.main(["labels", "--t1", str(tmp_path / "case" / "P_t1.nii.gz"), "-o", str(labels)]) == 143
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == "medsynth: terminated" and "Traceback" not in err, err
        assert not labels.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["case"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_model_folder_write_removes_the_temporary_folder_a_killed_run_left(tmp_path):
    from MedSynthLib.schema.volume_io import atomic_directory

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process
    stale = tmp_path / f".model{STAGE_MARK}{gone.pid}-abc.tmp"
    (stale / "weights.safetensors").parent.mkdir()
    (stale / "weights.safetensors").write_text("half")
    with atomic_directory(tmp_path / "model") as folder:
        (folder / "weights.safetensors").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
