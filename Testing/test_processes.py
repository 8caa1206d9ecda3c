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
