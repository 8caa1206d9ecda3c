"""Temporary files of single-file writes (``write_image``, ``write_json``) that a killed process left.

``kill -9`` or a power loss between a write's temporary file and its rename leaves the temporary beside the
output.  Its name carries the writer's process id, as a staging folder's does, so the next write of that output
removes the temporaries of processes that are gone and leaves those of a write still running alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSynthLib.schema.outputs import STAGE_MARK, commit_files, staging_folder
from MedSynthLib.schema.volume_io import TMP_PAIR_SUFFIX, write_image, write_json

REPO = Path(__file__).resolve().parents[1]


def _image(value: int = 3) -> sitk.Image:
    array = np.zeros((8, 10, 12), np.uint8)
    array[2:6, 2:8, 2:10] = value
    return sitk.GetImageFromArray(array)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _killed_mid_write(call: str, path: Path) -> int:
    """Run ``call`` (a write of ``path``) in a child that SIGKILLs itself at the rename; returns the child's pid."""
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import numpy as np, SimpleITK as sitk
from pathlib import Path
from MedSynthLib.schema.volume_io import write_image, write_json

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = die  # the temporary is complete; the rename never comes
path = Path({str(path)!r})
image = sitk.GetImageFromArray(np.ones((8, 10, 12), np.uint8))
{call}
"""
    process = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE, text=True)
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, err
    return process.pid


@pytest.fixture
def live_pid():
    """The pid of a process that runs while the test does (a write in progress elsewhere)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("name, call", [
    ("a.nii.gz", "write_image(image, path)"),
    ("a.nrrd", "write_image(image, path)"),
    ("a.json", "write_json({'x': 1}, path)"),
])
def test_a_killed_write_leaves_a_temporary_the_next_write_removes(name, call, tmp_path, live_pid):
    """Before, ``.a.nii.gz.k3j9x.tmp.nii.gz`` carried no owner: it stayed for good, since nothing could tell it
    from the temporary of a write still running."""
    path = tmp_path / name
    dead = _killed_mid_write(call, path)
    (left,) = _hidden(tmp_path)
    assert left.startswith(f".{name}{STAGE_MARK}{dead}-") and left.endswith(".tmp" + name[1:]), left
    assert not path.exists()
    running = tmp_path / f".{name}{STAGE_MARK}{live_pid}-live.tmp{name[1:]}"
    running.write_bytes(b"half")
    mine = tmp_path / f".{name}{STAGE_MARK}{os.getpid()}-thread.tmp{name[1:]}"  # another thread of this process
    mine.write_bytes(b"half")
    if name.endswith(".json"):
        write_json({"x": 2}, path)
        assert json.loads(path.read_text()) == {"x": 2}
    else:
        write_image(_image(5), path)
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).max() == 5
    assert _hidden(tmp_path) == sorted([running.name, mine.name])
    assert running.read_bytes() == b"half"


def test_only_the_same_outputs_temporaries_are_removed(tmp_path):
    """A stale temporary of another output in the folder (and a user's hidden file) stays: that output's own next
    write removes it."""
    dead = _killed_mid_write("write_json({'x': 1}, path)", tmp_path / "b.json")
    other = _hidden(tmp_path)
    (tmp_path / ".notes.tmp.json").write_text("a user's")
    write_json({"x": 2}, tmp_path / "a.json")
    assert _hidden(tmp_path) == sorted(other + [".notes.tmp.json"])
    assert str(dead) in other[0]
    write_json({"x": 2}, tmp_path / "b.json")
    assert _hidden(tmp_path) == [".notes.tmp.json"]


def test_a_label_map_commit_removes_a_killed_writes_temporary(tmp_path, live_pid):
    """The commit of a staged output (a label map and its sidecar) cleans the same names under its lock."""
    path = tmp_path / "labels.nii.gz"
    _killed_mid_write("write_image(image, path)", path)
    running = tmp_path / f".labels.nii.gz{STAGE_MARK}{live_pid}-live.tmp.nii.gz"
    running.write_bytes(b"half")
    with staging_folder(path) as stage:
        write_image(_image(), stage / path.name)
        commit_files({stage / path.name: path}, overwrite=False)
    assert _hidden(tmp_path) == [running.name]
    assert _visible(tmp_path) == ["labels.nii.gz"]


@pytest.mark.parametrize("compress, data", [(False, "a.raw"), (True, "a.zraw")])
def test_a_killed_pair_write_is_removed_and_a_live_one_kept(compress, data, tmp_path, live_pid):
    """``.mhd`` + ``.raw``: SimpleITK writes both into one hidden folder named with the writer's pid; killed before
    the moves, the next write of the header removes that folder, never a running writer's."""
    path = tmp_path / "a.mhd"
    dead = _killed_mid_write(f"write_image(image, path, compress={compress})", path)
    (left,) = _hidden(tmp_path)
    assert left.startswith(f".a.mhd{STAGE_MARK}{dead}-") and left.endswith(TMP_PAIR_SUFFIX), left
    assert sorted(p.name for p in (tmp_path / left).iterdir()) == sorted(["a.mhd", data])
    running = tmp_path / f".a.mhd{STAGE_MARK}{live_pid}-live{TMP_PAIR_SUFFIX}"
    running.mkdir()
    (running / "a.raw").write_bytes(b"half")
    write_image(_image(5), path, compress=compress)
    assert _hidden(tmp_path) == [running.name]
    assert _visible(tmp_path) == sorted(["a.mhd", data])
    assert (running / "a.raw").read_bytes() == b"half"


def test_a_folder_replace_killed_between_its_renames_leaves_nothing_for_good(tmp_path):
    """``atomic_directory`` with ``overwrite`` moves the old folder aside, then the new one in.  Killed between the
    two, the old folder stayed beside the output for good (``.out.XXXX.old``, no pid); the next write of the
    folder now removes it with the killed run's staging folder."""
    path = tmp_path / "out"
    path.mkdir()
    (path / "old.txt").write_text("old")
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from MedSynthLib.schema.volume_io import atomic_directory

real, calls = os.replace, []
def replace(*args, **kwargs):
    calls.append(args)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
os.replace = replace
with atomic_directory({str(path)!r}, overwrite=True) as stage:
    (stage / "new.txt").write_text("new")
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not path.exists() and len(_hidden(tmp_path)) == 2  # the staged new folder, the old one aside
    from MedSynthLib.schema.volume_io import atomic_directory

    with atomic_directory(path) as stage:
        (stage / "new.txt").write_text("again")
    assert _hidden(tmp_path) == []
    assert sorted(p.name for p in path.iterdir()) == ["new.txt"]
