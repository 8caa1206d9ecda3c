"""Process helpers of the module: is a process alive, the processes of a group, the backend's Python.

The backend itself runs in one long-lived worker (:mod:`.jobs`); these helpers
serve it and its tests.  Nothing here imports Qt or Slicer.
"""

from __future__ import annotations

import os
import sys


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
