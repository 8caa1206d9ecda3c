"""``generate`` stops its worker processes itself when cancelled (they ignore Ctrl+C), through multiprocessing's
public list of child processes, and leaves alone the children it did not start.

The whole command under Ctrl+C is ``test_generate.py::test_ctrl_c_while_workers_start_ends_in_one_line``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from test_generate import _argv, gen_data, medsynth_home  # noqa: F401 - phantom data, command line, keys folder
from MedSynthLib.generate.runner import _children, _process_pool, _spawning_without_sigint, _stop_workers


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """Ctrl+C raises KeyboardInterrupt here, as in medsynth run from a terminal: the tests may run in a process that
    ignores SIGINT (a pytest-xdist worker, or any job a CI runner started in the background)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _busy(flag: str) -> None:
    """A case that takes long: it says it started, then works for a minute."""
    Path(flag).touch()
    time.sleep(60)


def test_stopping_a_busy_pool_terminates_its_workers_and_only_them(tmp_path):
    context = multiprocessing.get_context("spawn")
    bystander = context.Process(target=time.sleep, args=(60,))  # a child started before the pool, not its own
    bystander.start()
    try:
        others = _children()
        pool = _process_pool(2, context)
        with _spawning_without_sigint():
            running = [pool.submit(_busy, str(tmp_path / f"started{i}")) for i in range(2)]
            waiting = pool.submit(_busy, str(tmp_path / "started2"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(tmp_path.glob("started*"))) < 2:
            time.sleep(0.05)
        assert sorted(p.name for p in tmp_path.glob("started*")) == ["started0", "started1"], "no worker got busy"
        workers = set(multiprocessing.active_children()) - others
        assert len(workers) == 2, "the pool's workers did not start"
        started = time.monotonic()
        _stop_workers(pool, others)
        assert time.monotonic() - started < 30, "the workers were waited for, not stopped"
        assert not any(worker.is_alive() for worker in workers)
        assert all(future.done() for future in running + [waiting])
        assert not (tmp_path / "started2").exists(), "the case not started was started"
        assert waiting.cancelled() or waiting.exception(timeout=0) is not None
        assert bystander.is_alive(), "a child the pool did not start was stopped"
    finally:
        bystander.terminate()
        bystander.join(10)


def test_stopping_a_pool_that_never_started_a_worker_is_harmless():
    others = _children()
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    _stop_workers(pool, others)
    with pytest.raises(RuntimeError):
        pool.submit(time.sleep, 0)  # shut down


def _interrupt_after_first_spawn(monkeypatch) -> list[int]:
    """Ctrl+C (SIGINT to this process) right after the first worker process is launched, inside the spawning
    window: the moment a SIGINT used to be dropped.  Returns the list the launched pids are appended to."""
    from multiprocessing import popen_spawn_posix

    launched: list[int] = []
    launch = popen_spawn_posix.Popen._launch

    def launch_then_interrupt(self, process_obj):
        launch(self, process_obj)
        launched.append(self.pid)
        if len(launched) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(popen_spawn_posix.Popen, "_launch", launch_then_interrupt)
    return launched


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal handlers: main thread")
def test_ctrl_c_while_workers_spawn_is_answered_once_they_have_started(monkeypatch):
    """The parent ignored SIGINT while its workers started (so that they inherit that): a Ctrl+C in that window was
    dropped and the run went on.  It is now held until the workers have started, then raised."""
    launched = _interrupt_after_first_spawn(monkeypatch)
    others = _children()
    pool = _process_pool(2, multiprocessing.get_context("spawn"))
    finished_spawning = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with _spawning_without_sigint():
                futures = [pool.submit(time.sleep, 0) for _ in range(2)]
                finished_spawning = True
        assert finished_spawning, "the interrupt was raised in the middle of starting the workers"
        assert len(launched) == 2
    finally:
        _stop_workers(pool, others)
    assert all(future.done() for future in futures)


def _sigint_state() -> tuple[bool, bool]:
    """In a worker: (SIGINT ignored, SIGINT blocked)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # blocks nothing more: reads the mask
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN, signal.SIGINT in blocked


def _count(n: int) -> int:
    return n + 1


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal handlers: main thread")
def test_workers_ignore_sigint_and_hold_none_blocked(monkeypatch):
    """A worker started in the window ignores SIGINT (only the parent answers Ctrl+C) and does not keep it blocked
    (what it starts itself would inherit the block); a Ctrl+C sent to it while it started left no traceback and
    did not stop it; the initialiser it was given still runs."""
    _interrupt_after_first_spawn(monkeypatch)
    others = _children()
    pool = _process_pool(2, multiprocessing.get_context("spawn"), initializer=_count, initargs=(1,))
    try:
        with pytest.raises(KeyboardInterrupt):
            with _spawning_without_sigint():
                futures = [pool.submit(_sigint_state) for _ in range(2)]
        workers = set(multiprocessing.active_children()) - others
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)  # Ctrl+C reaches the whole process group
        assert [future.result(timeout=120) for future in futures] == [(True, False)] * 2
        assert pool.submit(_count, 2).result(timeout=60) == 3, "a worker was stopped by SIGINT"
    finally:
        _stop_workers(pool, others)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal handlers: main thread")
def test_generate_cancelled_by_ctrl_c_while_its_workers_spawn(gen_data, tmp_path, monkeypatch, capsys):
    """The whole command: a Ctrl+C while ``--workers 2`` start ran the dataset to the end with exit 0; it now
    ends in the one line and exit status 130, with no dataset written and no worker left running."""
    from MedSynthLib.cli import main

    launched = _interrupt_after_first_spawn(monkeypatch)
    others = _children()
    out = tmp_path / "interrupted"
    assert main(_argv(gen_data, out, "--workers", "2")) == 130
    assert launched, "generate started no worker process"
    assert capsys.readouterr().err.strip().splitlines()[-1] == "medsynth: cancelled"
    assert not (out / "dataset.json").exists() and not list(out.glob("**/dataset.json"))
    assert not set(multiprocessing.active_children()) - others, "a worker was left running"
