"""The client of the backend worker: one process for generate, preview and export.

:class:`WorkerClient` starts ``worker.py`` once (in its own process group) and
keeps it: the model stays loaded between requests.  Two daemon threads read the
worker's stdout (typed events, :mod:`.protocol`) and stderr (its free-text log)
into queues; nothing is ever parsed from free text.  :meth:`WorkerClient.poll`
- called from the widget's ``QTimer`` in the GUI thread, or by a loop in tests -
drains the queues and updates the :class:`WorkerTask` s; the GUI thread never
waits on the worker.

Cancel (:meth:`WorkerClient.cancel`) sends a ``cancel`` request; when the
worker has not confirmed within the grace time (a network pass cannot be
interrupted) the whole process group is killed, so a cancel never takes more
than about half a second.  Cancel stops only its own request: one still queued
is dropped by the worker (nothing is killed), and when the running one needs
the kill, the requests queued behind it (they never started) are sent again
to a new worker.  A worker that dies is reported on every open task in one
line.  Nothing here imports Qt or Slicer.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .process import group_pids
from .protocol import Event, ProtocolError, Request, decode, encode, exchange_folder, put_array, take_array
from .signals import Signal

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"
#: How long a cancel waits for the worker to stop at its next step before killing it.
CANCEL_GRACE_S = 0.1
#: Every client that started a worker: stopped at interpreter exit (a script need not call ``cleanup()``).
_CLIENTS: "weakref.WeakSet[WorkerClient]" = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    """Stop the workers while the interpreter still runs normally: once it finalises, closing a pipe that a
    reader thread is blocked on aborts the process ("Fatal Python error: _enter_buffered_busy")."""
    for client in list(_CLIENTS):
        try:
            client.close(timeout_s=1.0)
        except Exception:  # noqa: BLE001 - exiting anyway: stop the others
            pass


class WorkerTask:
    """One request in flight: status, progress and, when done, the result or the one-line error.

    Attributes:
        status: ``running``, ``done``, ``failed`` or ``cancelled``.
        result: the ``result`` event (data + arrays) once done.
        error: the one-line message once failed or cancelled.
        fraction, text: the last progress report.

    Signals:
        progress(float, str): each progress report (emitted from :meth:`poll`).
    """

    def __init__(self, client: "WorkerClient", request_id: int, op: str) -> None:
        self.client = client
        self.id = request_id
        self.op = op
        self.status = "running"
        self.result: Event | None = None
        self.error: str | None = None
        self.fraction = 0.0
        self.text = ""
        self.started = time.monotonic()
        self.ended: float | None = None
        self.progress = Signal("float", "str")
        self._arrays: dict[str, np.ndarray] | None = None
        # What was sent (params, arrays), kept while open: a cancel that kills the worker sends it again.
        self._request: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None

    @property
    def pid(self) -> int | None:
        """The worker process serving this task."""
        return self.client.pid

    @property
    def cancelled(self) -> bool:
        return self.status == "cancelled"

    def is_running(self) -> bool:
        return self.status == "running"

    def poll(self) -> bool:
        """Let the client dispatch what arrived; True while this task runs."""
        self.client.poll()
        return self.is_running()

    def wait(self, timeout: float | None = None, interval: float = 0.01) -> str:
        """Poll until the task ends; returns its status.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (it is left running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.op} still running after {timeout} s")
            time.sleep(interval)
        return self.status

    def arrays(self) -> dict[str, np.ndarray]:
        """The result's arrays (loaded once; their files are deleted)."""
        if self._arrays is None:
            refs = self.result.arrays if self.result is not None else {}
            self._arrays = {name: take_array(ref) for name, ref in refs.items()}
        return self._arrays

    def _end(self, status: str, error: str | None = None, result: Event | None = None) -> None:
        if self.status != "running":
            return
        self.status, self.error, self.result, self.ended = status, error, result, time.monotonic()
        self._request = None  # never sent again: its arrays can go
        if status == "done":
            self.fraction = 1.0


class WorkerClient:
    """A long-lived backend worker and its open tasks.

    Args:
        python: the Python that runs the worker (``PythonSlicer`` in Slicer).
        env: its environment (MedSynthLib importable).
        log: receives the worker's log lines (its stderr) and notices of this client.
    """

    def __init__(self, python: str, env: Mapping[str, str] | None = None,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.python = python
        self.env = dict(env) if env is not None else None
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.exchange: Path | None = None
        self.tasks: dict[int, WorkerTask] = {}
        self.stderr_tail: list[str] = []
        self._ids = itertools.count(1)
        self._events: queue.Queue[Event | None] = queue.Queue()
        self._log_lines: queue.Queue[str] = queue.Queue()
        self._write_lock = threading.Lock()
        self.ready: Event | None = None

    # --- the process ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the worker (once; again after it ended)."""
        if self.alive():
            return
        self._forget_process()
        self.exchange = exchange_folder()
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        self._events = queue.Queue()
        self._log_lines = queue.Queue()
        self.stderr_tail = []
        self.proc = subprocess.Popen([self.python, str(WORKER_SCRIPT), "--exchange", str(self.exchange)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, **kwargs)
        _CLIENTS.add(self)
        proc, events, lines = self.proc, self._events, self._log_lines
        threading.Thread(target=self._read_events, args=(proc, events, lines), name="medsynth-worker-events",
                         daemon=True).start()
        threading.Thread(target=self._read_log, args=(proc, lines), name="medsynth-worker-log", daemon=True).start()

    @staticmethod
    def _read_events(proc: subprocess.Popen, events: queue.Queue, lines: queue.Queue) -> None:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                text = raw.decode("utf-8", errors="replace").strip()
                if not text:
                    continue
                try:
                    message = decode(text)
                except ProtocolError as exc:
                    lines.put(f"worker: {exc}")
                    continue
                if isinstance(message, Event):
                    events.put(message)
        except (OSError, ValueError):  # the client closed the pipe (kill)
            pass
        events.put(None)  # the worker's stdout closed: it ended

    @staticmethod
    def _read_log(proc: subprocess.Popen, lines: queue.Queue) -> None:
        assert proc.stderr is not None
        try:
            for raw in proc.stderr:
                text = raw.decode("utf-8", errors="replace").rstrip()
                if text:
                    lines.put(text)
        except (OSError, ValueError):  # the client closed the pipe (kill)
            pass

    # --- requests -------------------------------------------------------------------------------

    def submit(self, op: str, params: Mapping[str, Any] | None = None,
               arrays: Mapping[str, np.ndarray] | None = None) -> WorkerTask:
        """Send one request (starting the worker when needed); returns its task at once."""
        task = WorkerTask(self, 0, op)
        task._request = (dict(params or {}), dict(arrays or {}))
        self._send_task(task)
        return task

    def _send_task(self, task: WorkerTask) -> None:
        """Send a task's request to the worker (started when needed) under a new request id."""
        self.start()
        assert self.exchange is not None and task._request is not None
        params, arrays = task._request
        request = Request(next(self._ids), task.op, params,
                          {name: put_array(self.exchange, array) for name, array in arrays.items()})
        task.id = request.id
        self.tasks[request.id] = task
        if not self._send(request):
            task._end("failed", self._ended_message())

    def _send(self, request: Request) -> bool:
        try:
            with self._write_lock:
                assert self.proc is not None and self.proc.stdin is not None
                self.proc.stdin.write((encode(request) + "\n").encode("utf-8"))
                self.proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def poll(self) -> bool:
        """Dispatch every event and log line that arrived; True while a task is running."""
        while True:
            try:
                line = self._log_lines.get_nowait()
            except queue.Empty:
                break
            self.stderr_tail = (self.stderr_tail + [line])[-50:]
            self.log(line)
        ended = False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event is None:
                ended = True
                break
            self._dispatch(event)
        if ended:
            self._worker_ended()
        return any(task.is_running() for task in self.tasks.values())

    def _dispatch(self, event: Event) -> None:
        if event.type == "ready":
            self.ready = event
            return
        task = self.tasks.get(event.id)
        if task is None:
            if event.type == "error":
                self.log(f"worker: {event.text}")
            return
        if event.type == "progress":
            task.fraction, task.text = event.fraction, event.text
            task.progress.emit(event.fraction, event.text)
        elif event.type == "result":
            task._end("done", result=event)
            task.progress.emit(1.0, event.text)
        elif event.type == "error":
            task._end("failed", event.text)
        elif event.type == "cancelled":
            task._end("cancelled", event.text)
        if not task.is_running():
            del self.tasks[event.id]

    def _ended_message(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        if code is not None and code < 0:
            how = f"was stopped by signal {-code}"
        elif code is not None:
            how = f"ended with status {code}"
        else:
            how = "stopped answering"
        last = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
        return f"the MedSynth worker process {how}" + (f" ({last.strip()})" if last else "")

    def _worker_ended(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        while True:  # its last log lines explain why
            try:
                self.stderr_tail = (self.stderr_tail + [self._log_lines.get(timeout=0.05)])[-50:]
            except queue.Empty:
                break
        message = self._ended_message()
        for task in list(self.tasks.values()):
            task._end("failed", message)
        self.tasks.clear()
        self._forget_process()

    # --- cancel / close ------------------------------------------------------------------------

    def cancel(self, task: WorkerTask, grace_s: float | None = None) -> bool:
        """Stop ``task`` and no other request.

        A task queued behind another has not started: the worker drops it when it gets there (the
        task ends ``cancelled`` now).  The running one gets a cancel request, and the worker is killed
        when it has not stopped after ``grace_s`` (default :data:`CANCEL_GRACE_S`); the requests queued
        behind it never started, so they are sent again to a new worker instead of ending with it.

        Returns:
            True when the task has ended (it is ``cancelled`` unless it had finished).
        """
        grace_s = CANCEL_GRACE_S if grace_s is None else grace_s
        self.poll()
        if not task.is_running():
            return True
        open_tasks = sorted((t for t in self.tasks.values() if t.is_running()), key=lambda t: t.id)
        if open_tasks and open_tasks[0] is not task and task.id in self.tasks:
            # The worker serves requests one at a time, in order: this one waits behind the running one,
            # which a kill would end with it.
            self._send(Request(next(self._ids), "cancel", {"target": task.id}))
            del self.tasks[task.id]  # the worker's late "cancelled" answer is ignored
            task._end("cancelled", f"{task.op} cancelled")
            return True
        if grace_s > 0 and self.alive() and self._send(Request(next(self._ids), "cancel", {"target": task.id})):
            deadline = time.monotonic() + grace_s
            while task.is_running() and time.monotonic() < deadline:
                time.sleep(0.01)
                self.poll()
        if task.is_running():
            queued = [t for t in open_tasks if t is not task and t.is_running()]
            for other in queued:  # kept out of kill(), which ends every open task
                self.tasks.pop(other.id, None)
            self.kill()
            task._end("cancelled", f"{task.op} cancelled")
            for other in queued:
                try:
                    self._send_task(other)
                except OSError as exc:
                    other._end("failed", f"the MedSynth worker could not be started again ({exc})")
            if queued:
                self.log(f"worker restarted to cancel {task.op}; {len(queued)} queued request(s) sent again")
        return not task.is_running()

    def kill(self) -> None:
        """Kill the worker's whole process group now; open tasks end as cancelled."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                if os.name == "nt":
                    subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True, check=False)
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            # The leader is reaped, but a SIGKILLed child can still be tearing down its memory:
            # the tree has ended only when no member of the group is left.
            deadline = time.monotonic() + 5.0
            while os.name != "nt" and group_pids(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        for task in list(self.tasks.values()):
            task._end("cancelled", f"{task.op} cancelled")
        self.tasks.clear()
        self._forget_process()

    def close(self, timeout_s: float = 2.0) -> None:
        """Ask the worker to quit; kill it when it has not within ``timeout_s``."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self._send(Request(next(self._ids), "quit"))
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _forget_process(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        self.proc = None
        self.ready = None
        if self.exchange is not None:
            shutil.rmtree(self.exchange, ignore_errors=True)
            self.exchange = None

    def __del__(self) -> None:  # never leave an orphaned worker running
        try:
            if sys.is_finalizing():
                # Only the signal: closing the pipes (or waiting) now can abort the interpreter (see
                # _stop_workers_at_exit, which normally stopped the worker already).
                proc = self.proc
                if proc is not None and proc.poll() is None and os.name != "nt":
                    os.killpg(proc.pid, signal.SIGKILL)
                return
            self.kill()
        except Exception:  # noqa: BLE001
            pass


def labelmap_request(labelmap: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The params and arrays that carry a MedSynthLib ``LabelMap`` to the worker (its privacy record as measured
    edit by edit too: rebuilt from the history alone it is only a bound, or unknown)."""
    from MedSynthLib.schema.provenance import privacy_of

    params = {"grid": labelmap.grid.to_json(), "history": list(labelmap.history),
              "privacy": privacy_of(labelmap).to_json()}
    return params, {"labels": labelmap.array}


__all__ = ["CANCEL_GRACE_S", "WorkerClient", "WorkerTask", "labelmap_request"]
