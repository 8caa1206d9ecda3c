"""VTK's messages while ``medsynth review`` serves: no warnings on the terminal, each error as one line.

trame-slicer's ``SlicerApp`` sends VTK's output window to stderr, and VTK's logger prints every message a
second time, in colour: on a computer without an X display the server printed some fifty lines of warnings
(the X probe, a deprecation notice per slice view) that say nothing to a reader.  Warnings are dropped;
an error (a view that cannot render) is still said, in one line, once however often it recurs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

RENDER_WINDOW_VARIABLE = "VTK_DEFAULT_OPENGL_WINDOW"  # VTK's choice of OpenGL window class, read at each window
MAX_ERRORS_TOLD = 20  # distinct errors said on the terminal; a view failing at every frame floods nothing
_ADDRESS = re.compile(r" ?\(0x[0-9A-Fa-f]+\)")  # the object's address: one error of many objects is one error
_SOURCE = re.compile(r"^(ERROR|Warning|Generic Warning): In .*?, line \d+$")


def choose_offscreen_window(environ: MutableMapping[str, str] = os.environ) -> None:
    """Without an X display (Linux), render with EGL from the start.

    VTK would try X first and warn "bad X server connection" before it falls back to EGL (and from there to
    OSMesa, as it still does where EGL is missing); a window class the user chose is kept.
    """
    if sys.platform.startswith("linux") and not environ.get("DISPLAY") and not environ.get(RENDER_WINDOW_VARIABLE):
        environ[RENDER_WINDOW_VARIABLE] = "vtkEGLRenderWindow"


def one_line(text: str) -> str:
    """A VTK message as one line: without the source file and line, the object's address, or line breaks."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if lines and _SOURCE.match(lines[0]):
        lines = lines[1:]
    return _ADDRESS.sub("", " ".join(lines)).strip()


class _ErrorLines:
    """Says each distinct VTK error once, as ``medsynth review: VTK error: ...``."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.told: set[str] = set()

    def __call__(self, text: Any) -> None:
        message = one_line(text)
        if not message or message in self.told or len(self.told) > MAX_ERRORS_TOLD:
            return
        self.told.add(message)
        if len(self.told) > MAX_ERRORS_TOLD:  # said once, after which nothing more is
            message = "further VTK errors are not shown"
        else:
            message = f"VTK error: {message}"
        print(f"medsynth review: {message}", file=self.stream or sys.stderr, flush=True)


def quiet_vtk(stream: TextIO | None = None) -> Any:
    """Route VTK's messages as this module says (call after ``SlicerApp()``, which sets its own output window,
    and before any view is made).  Returns the output window now in use."""
    from vtkmodules.util.misc import calldata_type
    from vtkmodules.util.vtkConstants import VTK_STRING
    from vtkmodules.vtkCommonCore import vtkCommand, vtkLogger, vtkOutputWindow

    choose_offscreen_window()
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)  # its copy of every message, in colour
    window = vtkOutputWindow()
    window.SetDisplayModeToNever()  # the window still raises its events: errors are said by the observer
    tell = _ErrorLines(stream)

    @calldata_type(VTK_STRING)
    def on_error(_window: Any, _event: str, text: Any) -> None:
        tell(text)

    window.AddObserver(vtkCommand.ErrorEvent, on_error)
    vtkOutputWindow.SetInstance(window)
    return window
