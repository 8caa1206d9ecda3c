"""The Slicer module's background process runner (no Qt, no MRML): progress, output, process-tree cancel."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSynth"))

from MedSynthSlicerLib.process import ProcessRunner, group_pids, parse_tqdm_progress, pid_alive  # noqa: E402
from MedSynthSlicerLib.signals import Signal  # noqa: E402

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX here; Windows uses taskkill /T")


def test_signal_connect_emit_disconnect():
    signal = Signal("int")
    seen: list[int] = []
    signal.connect(seen.append)
    signal.connect(seen.append)  # connected once
    signal.emit(1)
    signal(2)
    signal.disconnect(seen.append)
    signal.emit(3)
    assert seen == [1, 2]


@pytest.mark.parametrize("line, fraction, text", [
    ("synthesize:   0%|          | 0/3 [00:00<?, ?step/s]", 0.0, "synthesize"),
    ("synthesize:  33%|███▎      | 1/3 [00:06<00:13,  6.61s/step, model loaded]", 1 / 3, "model loaded"),
    ("export: 100%|##########| 2/2 [00:01<00:00,  1.2step/s, checked SYNTH-12]", 1.0, "checked SYNTH-12"),
])
def test_parse_tqdm_progress(line, fraction, text):
    report = parse_tqdm_progress(line)
    assert report is not None
    assert report.fraction == pytest.approx(fraction)
    assert report.text == text


def test_parse_tqdm_progress_ignores_other_lines():
    assert parse_tqdm_progress("medsynth: error: labels.nii.gz: file not found") is None
    assert parse_tqdm_progress("50% done") is None


def test_runner_lines_progress_and_finished_once():
    script = textwrap.dedent("""
        import sys, time
        sys.stdout.write("first line\\n"); sys.stdout.flush()
        for n in range(3):
            sys.stderr.write(f"\\rjob: {33 * n}%|#  | {n}/3 [00:00<00:00, 1.0step/s, step {n}]"); sys.stderr.flush()
            time.sleep(0.05)
        print("\\nlast line")
        sys.exit(3)
    """)
    runner = ProcessRunner()
    lines, progress, finished = [], [], []
    runner.output.connect(lines.append)
    runner.progress.connect(lambda f, t: progress.append((round(f, 3), t)))
    runner.finished.connect(finished.append)
    runner.start([sys.executable, "-c", script])
    assert runner.wait(timeout=60) == 3
    assert runner.poll() is False  # finished is emitted once
    assert finished == [3]
    assert lines[0] == "first line" and lines[-1] == "last line"
    assert progress == [(0.0, "step 0"), (0.333, "step 1"), (0.667, "step 2")]
    assert not runner.is_running()


@posix_only
def test_cancel_kills_the_whole_process_tree_within_seconds(tmp_path):
    """The child starts a grandchild (like PythonSlicer -> python-real); cancel ends both."""
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(600)
    """)
    runner = ProcessRunner()
    finished = []
    runner.finished.connect(finished.append)
    runner.start([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the grandchild did not start"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    leader = runner.pid
    assert pid_alive(leader) and pid_alive(grandchild)
    start = time.monotonic()
    assert runner.cancel(grace_s=1.0) is True
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"cancel took {elapsed:.1f} s"
    assert not pid_alive(leader)
    assert not pid_alive(grandchild)
    assert group_pids(leader) == []
    assert finished == [ProcessRunner.CANCELLED]
    assert not runner.is_running()


@posix_only
def test_cancel_a_process_that_ignores_sigterm(tmp_path):
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    runner = ProcessRunner()
    runner.start([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while "ready" not in runner.lines:
        runner.poll()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    start = time.monotonic()
    assert runner.cancel(grace_s=0.5)
    assert time.monotonic() - start < 5.0
    assert not pid_alive(runner.pid)


def test_start_refuses_a_second_process():
    runner = ProcessRunner()
    runner.start([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(RuntimeError, match="already running"):
            runner.start([sys.executable, "-c", "pass"])
    finally:
        runner.cancel(grace_s=0.5)
