"""Process helpers of the module: is a process alive, the processes of a group, the backend's Python.

The backend itself runs in one long-lived worker (:mod:`.jobs`); these helpers
serve it and its tests.  Nothing here imports Qt or Slicer.  ``pid_alive`` and
``group_pids`` are MedSynthLib's (:mod:`MedSynthLib.schema.processes`, standard
library only, also used by the output commits), so loading this module brings
no numpy and none of the backend's science with it.
"""

from __future__ import annotations

import os
import sys

from .environment import ensure_medsynthlib_importable

ensure_medsynthlib_importable()

from MedSynthLib.schema.processes import group_pids, pid_alive  # noqa: E402

__all__ = ["group_pids", "pid_alive", "python_executable"]



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
