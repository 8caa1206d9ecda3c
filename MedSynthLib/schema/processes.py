"""Is a process alive, and which processes form a group: standard library only.

Shared by the output commits (:mod:`.outputs` removes a killed run's staging folder once its
process is gone) and by the Slicer module, which imports it when it loads; so nothing here may
import numpy or any other module of MedSynthLib.
"""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running process.

    A process that has exited but is not yet reaped by its parent (a zombie) is not alive,
    although a signal-0 probe still succeeds on it.  On Windows the process is asked for its
    exit code (``os.kill(pid, 0)`` there would terminate it).
    """
    if os.name == "nt":
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
            return True  # there, but not readable to us
        return state not in ("Z", "X")
    try:  # macOS and other POSIX systems without /proc
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
