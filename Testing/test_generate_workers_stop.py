"""``generate`` stops its worker processes itself when cancelled (they ignore Ctrl+C), through multiprocessing's
public list of child processes, and leaves alone the children it did not start.

The whole command under Ctrl+C is ``test_generate.py::test_ctrl_c_while_workers_start_ends_in_one_line``.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from MedSynthLib.generate.runner import _children, _spawning_without_sigint, _stop_workers


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
        pool = ProcessPoolExecutor(2, mp_context=context)
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
