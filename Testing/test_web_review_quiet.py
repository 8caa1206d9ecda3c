"""``medsynth review`` says nothing on stderr but its own lines while it serves and renders pages.

VTK, which renders the views off screen, printed about 50 lines of warnings in colour on a computer
without an X display (``bad X server connection. DISPLAY=``, a deprecation warning per view).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_web_review import (  # noqa: F401 (fixtures)
    PAGE_WAIT_MS,
    REPO,
    SERVER_START_S,
    _free_port,
    _render_settled,
    _wait_for_images,
    browser,
    cases,
)

OWN_LINE = "medsynth review: "


def _serve_and_render(browser, args: list[str], images: int, tmp_path: Path) -> tuple[str, str]:
    """Start ``medsynth review ARGS`` with no X display, open its page until ``images`` views have rendered,
    stop it; its stdout and stderr."""
    port = _free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("DISPLAY", None)
    env.pop("VTK_DEFAULT_OPENGL_WINDOW", None)
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "MedSynthLib", "review", *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=stdout, stderr=stderr, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert process.poll() is None, f"medsynth review exited:\n{err.read_text()[-3000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "medsynth review did not listen"
                time.sleep(0.5)
        address = next(word for word in out.read_text().split() if "?token=" in word)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        try:
            page.goto(address, timeout=PAGE_WAIT_MS)
            _wait_for_images(page, images)
            _render_settled(page, page.locator("img").first, "first view")
        finally:
            page.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return out.read_text(), err.read_text()


def _without_closing_transport_tracebacks(stderr: str) -> str:
    """stderr without wslink's report of a frame sent as the test's browser page closed (the web library's own
    traceback of a connection reset at teardown: not VTK's, and timing-dependent)."""
    import re

    block = re.compile(r"Task exception was never retrieved\n.*?\n[\w.]*ClientConnectionResetError: Cannot write to "
                       r"closing transport\n?", re.S)
    return block.sub("", stderr)


def _assert_only_own_lines(stderr: str) -> None:
    stderr = _without_closing_transport_tracebacks(stderr)
    foreign = [line for line in stderr.splitlines() if line.strip() and not line.startswith(OWN_LINE)]
    assert not foreign, f"{len(foreign)} line(s) on stderr that are not medsynth review's own:\n" + "\n".join(
        foreign[:12])
    assert "\x1b[" not in stderr


def test_the_review_server_prints_no_vtk_warnings(browser, cases, tmp_path):
    synthetic = tmp_path / "synthetic_0"
    shutil.copytree(cases["synthetic"][0], synthetic)
    stdout, stderr = _serve_and_render(browser, [str(synthetic), "--pair", str(synthetic), str(cases["real"][0])],
                                       8, tmp_path)
    assert "review of 1 case(s) at http://127.0.0.1:" in stdout
    _assert_only_own_lines(stderr)


def test_the_study_server_prints_no_vtk_warnings(browser, cases, tmp_path):
    args = ["--study", *map(str, cases["real"]), "--synthetic", *map(str, cases["synthetic"]),
            "-o", str(tmp_path / "results"), "--n-per-class", "1"]
    stdout, stderr = _serve_and_render(browser, args, 1, tmp_path)
    assert "reader study (0 of 2 answered)" in stdout
    _assert_only_own_lines(stderr)


VTK_SCRIPT = """
from vtkmodules.vtkCommonCore import vtkOutputWindow
from vtkmodules.vtkImagingCore import vtkImageShiftScale
from MedSynthWeb.vtk_messages import quiet_vtk

quiet_vtk()
unconnected = vtkImageShiftScale()  # no input: each Update() reports an error
for _ in range(3):
    unconnected.Update()
window = vtkOutputWindow.GetInstance()
window.DisplayWarningText("Warning: In x.cxx, line 1\\nsomething deprecated\\n\\n")
window.DisplayGenericWarningText("Generic Warning: In x.cxx, line 2\\nbad X server connection\\n\\n")
"""


def test_vtk_errors_are_one_line_each_and_warnings_none():
    """A VTK error still reaches the terminal, as one line and once however often it recurs; a warning does not."""
    from importlib.util import find_spec

    if find_spec("vtkmodules") is None:
        pytest.skip("vtk not installed (pip install -e '.[web]')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", VTK_SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("medsynth review: VTK error: ") and "vtkImageShiftScale" in lines[0], lines
    assert "deprecated" not in done.stdout + done.stderr and "X server" not in done.stdout + done.stderr


def test_a_recurring_error_is_told_once_and_many_errors_end_in_one_line():
    import io

    from MedSynthWeb.vtk_messages import MAX_ERRORS_TOLD, _ErrorLines

    stream = io.StringIO()
    tell = _ErrorLines(stream)
    for address in ("0x1", "0x2ab"):  # one error of two objects
        tell(f"ERROR: In /src/vtkOpenGLRenderWindow.cxx, line 12\nvtkEGLRenderWindow ({address}): no context\n\n")
    for n in range(MAX_ERRORS_TOLD + 5):
        tell(f"ERROR: In x.cxx, line {n}\nerror {n}\n\n")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "medsynth review: VTK error: vtkEGLRenderWindow: no context"
    assert len(lines) == MAX_ERRORS_TOLD + 1 and lines[-1] == "medsynth review: further VTK errors are not shown"


def test_the_offscreen_window_is_chosen_only_without_a_display_or_a_users_choice(monkeypatch):
    from MedSynthWeb import vtk_messages

    monkeypatch.setattr(vtk_messages.sys, "platform", "linux")
    for environ, chosen in (({}, "vtkEGLRenderWindow"), ({"DISPLAY": ""}, "vtkEGLRenderWindow"),
                            ({"DISPLAY": ":0"}, None),
                            ({"VTK_DEFAULT_OPENGL_WINDOW": "vtkOSOpenGLRenderWindow"}, "vtkOSOpenGLRenderWindow")):
        vtk_messages.choose_offscreen_window(environ)
        assert environ.get("VTK_DEFAULT_OPENGL_WINDOW") == chosen, environ
