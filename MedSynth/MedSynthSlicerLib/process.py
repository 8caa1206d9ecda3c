"""Run a backend command in its own process, read its output on a thread, poll from the GUI.

The pattern of SlicerNNUnet / SlicerMONAIAuto3DSeg, without Qt:

* :class:`ProcessRunner` starts the command with :class:`subprocess.Popen` in a
  new session (POSIX) or process group (Windows), so the command and every
  process it starts form one group;
* a daemon thread reads the merged stdout/stderr and splits it into lines at
  ``\\n`` *and* ``\\r`` (progress bars redraw with ``\\r``) into a queue;
* :meth:`ProcessRunner.poll` - called by the widget from a ``QTimer`` in the
  GUI thread, or by a loop in tests - drains the queue and emits the
  :class:`~MedSynthSlicerLib.signals.Signal` s ``output``, ``progress`` and,
  once, ``finished``;
* :meth:`ProcessRunner.cancel` kills the whole process group (``SIGTERM``,
  then ``SIGKILL`` after a grace period; ``taskkill /T /F`` on Windows) and
  returns when it is gone.

Nothing here imports Qt or Slicer.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .signals import Signal

#: tqdm's bar: ``desc:  33%|###3      | 1/3 [00:01<00:02,  1.2s/step, model loaded]``
_TQDM = re.compile(r"(?:(?P<desc>[^:|\r\n]*):\s*)?(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<rest>[^\]]*)\]")


@dataclass(frozen=True)
class Progress:
    """One progress report: a fraction in [0, 1] and a short text."""

    fraction: float
    text: str


def parse_tqdm_progress(line: str) -> Progress | None:
    """Progress from one tqdm bar redraw (``n/total`` and the postfix text), else ``None``."""
    match = _TQDM.search(line)
    if not match:
        return None
    n, total = int(match["n"]), int(match["total"])
    if total <= 0:
        return None
    parts = [p.strip() for p in match["rest"].split(",")]
    text = ", ".join(p for p in parts[2:] if p) or (match["desc"] or "").strip()
    return Progress(min(max(n / total, 0.0), 1.0), text)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        except OSError:
            return True
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_pids(pgid: int) -> list[int]:
    """Live processes of a POSIX process group (from ``/proc``; elsewhere ``[pgid]`` while the group exists)."""
    if os.name == "nt":
        return []
    if not os.path.isdir("/proc/self"):  # macOS: no /proc, ask the kernel whether the group still exists
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


class ProcessRunner:
    """One background command with line output, progress, finish and a process-tree cancel.

    Signals:
        output(str): every output line (stdout and stderr merged).
        progress(float, str): parsed progress (see ``progress_parser``).
        finished(int): the exit status, emitted once by :meth:`poll` after the
            last line; negative (``-SIGTERM``/``-SIGKILL``) or
            :attr:`CANCELLED` when cancelled.

    Attributes:
        lines: the last ``keep_lines`` output lines.
    """

    CANCELLED = -1000

    def __init__(self, progress_parser: Callable[[str], Progress | None] | None = parse_tqdm_progress,
                 keep_lines: int = 400) -> None:
        self.output = Signal("str")
        self.progress = Signal("float", "str")
        self.finished = Signal("int")
        self.progress_parser = progress_parser
        self.lines: deque[str] = deque(maxlen=keep_lines)
        self.proc: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []
        self.returncode: int | None = None
        self.cancelled = False
        self.start_time = 0.0
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._reader_done = threading.Event()
        self._finished_emitted = False
        self.last_progress: Progress | None = None

    # --- state --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        """True until :meth:`poll` has seen the process end and emitted ``finished``."""
        return self.proc is not None and not self._finished_emitted

    # --- start ----------------------------------------------------------------------------------

    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        """Start ``command`` (a list of arguments, no shell) in a new process group."""
        if self.is_running():
            raise RuntimeError("a process is already running; cancel it first")
        self.command = [str(c) for c in command]
        self.lines.clear()
        self.returncode = None
        self.cancelled = False
        self._finished_emitted = False
        self._queue = queue.Queue()
        self._reader_done = threading.Event()
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        full_env = dict(os.environ if env is None else env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.setdefault("PYTHONIOENCODING", "utf-8")
        self.start_time = time.monotonic()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=cwd, **kwargs)
        self._reader = threading.Thread(target=self._read, name="medsynth-process-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buffer = ""
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                buffer += decoder.decode(chunk)
                *complete, buffer = re.split(r"\r\n|\r|\n", buffer)
                for line in complete:
                    if line.strip():
                        self._queue.put(line)
            buffer += decoder.decode(b"", final=True)
            if buffer.strip():
                self._queue.put(buffer)
        finally:
            self._queue.put(None)
            self._reader_done.set()

    # --- poll ---------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Drain pending output (emit ``output``/``progress``); emit ``finished`` once at the end.

        Returns:
            True while the process is running (call again later).
        """
        if self.proc is None or self._finished_emitted:
            return False
        ended_reading = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ended_reading = True
                break
            self.lines.append(item)
            self.output.emit(item)
            if self.progress_parser is not None:
                report = self.progress_parser(item)
                if report is not None:
                    self.last_progress = report
                    self.progress.emit(report.fraction, report.text)
        if ended_reading or self._reader_done.is_set() and self._queue.empty():
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:  # output closed but the process lingers
                    return True
            self.returncode = self.CANCELLED if self.cancelled else self.proc.returncode
            self._finished_emitted = True
            self.finished.emit(self.returncode)
            return False
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int:
        """Poll until the process ends; returns the exit status.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (it is left running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.command[:3])}... still running after {timeout} s")
            time.sleep(interval)
        assert self.returncode is not None
        return self.returncode

    # --- cancel -------------------------------------------------------------------------------

    def cancel(self, grace_s: float = 2.0, timeout_s: float = 10.0) -> bool:
        """Kill the process and everything it started; return when they are gone.

        ``SIGTERM`` to the whole group, ``SIGKILL`` after ``grace_s``; on Windows
        ``taskkill /T /F`` on the tree.  ``finished`` is emitted (with
        :attr:`CANCELLED`) by the next :meth:`poll`, which this method calls.

        Returns:
            True when no process of the group is left.
        """
        if self.proc is None:
            return True
        self.cancelled = True
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.proc.pid)], capture_output=True, check=False)
        else:
            self._signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and (self.proc.poll() is None or group_pids(pgid)):
                time.sleep(0.05)
            if self.proc.poll() is None or group_pids(pgid):
                self._signal_group(pgid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout_s
        while os.name != "nt" and group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Let the reader see EOF (the pipe closes when the last writer dies), then emit finished.
        self._reader_done.wait(timeout=timeout_s)
        self.poll()
        return self.proc.poll() is not None and not (os.name != "nt" and group_pids(pgid))

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __del__(self) -> None:  # never leave an orphaned backend running
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.cancel(grace_s=0.5, timeout_s=2.0)
        except Exception:
            pass


def python_executable() -> str:
    """The Python that runs the backend: ``PythonSlicer`` inside Slicer, else this interpreter.

    Inside the Slicer application ``sys.executable`` is Slicer itself; the
    ``PythonSlicer`` launcher next to it runs scripts in Slicer's Python
    environment (where the extension's dependencies are installed).
    """
    import shutil

    override = os.environ.get("MEDSYNTH_PYTHON")
    if override:
        return override
    executable = os.path.basename(sys.executable).lower()
    if executable.startswith("python"):
        return sys.executable
    return shutil.which("PythonSlicer") or sys.executable
