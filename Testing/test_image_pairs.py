"""Images written as a header and a separate data file (``.mhd`` + ``.zraw``, ``.nhdr`` + ``.raw.gz``).

Overwriting such a pair must not leave the old data file beside a header that no longer names it, and a write
killed half way must not leave its hidden folder behind for good.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSynthLib.schema.grid import Grid, LabelMap
from MedSynthLib.schema.labelmap import read_label_map, write_label_map
from MedSynthLib.schema.outputs import STAGE_MARK
from MedSynthLib.schema.volume_io import TMP_PAIR_SUFFIX, write_image

GRID = Grid((12, 10, 8), (1.0, 1.2, 1.5), (3.0, -4.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
#: The data file SimpleITK writes uncompressed and compressed beside each header.
DATA_FILES = {".mhd": ("raw", "zraw"), ".nhdr": ("raw", "raw.gz")}


def _labels(value: int = 3) -> np.ndarray:
    array = np.zeros(GRID.shape, np.uint8)
    array[2:6, 2:8, 2:10] = value
    return array


def _user_pair(path: Path, array: np.ndarray) -> dict[str, bytes]:
    """An uncompressed pair as another tool writes it (``a.mhd`` + ``a.raw``); returns its files' bytes."""
    sitk.WriteImage(GRID.image(array), str(path), useCompression=False)
    return {p.name: p.read_bytes() for p in path.parent.iterdir()}


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("suffix", list(DATA_FILES))
def test_overwriting_an_uncompressed_pair_removes_its_old_data_file(suffix, tmp_path):
    """Audit: ``--overwrite`` of a user's ``a.mhd`` + ``a.raw`` wrote ``a.mhd`` + ``a.zraw`` and left ``a.raw``,
    data no header names any more.  The data file the old header named goes with it."""
    path = tmp_path / f"a{suffix}"
    plain, packed = DATA_FILES[suffix]
    _user_pair(path, _labels(3))
    assert _visible(tmp_path) == sorted([path.name, f"a.{plain}"])
    write_image(GRID.image(_labels(5)), path, overwrite=True)
    assert _visible(tmp_path) == sorted([path.name, f"a.{packed}"])
    assert _hidden(tmp_path) == []
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), _labels(5))


def test_overwriting_a_label_map_pair_removes_its_old_data_file(tmp_path):
    """The same through write_label_map (``medsynth tumour ... -o a.mhd --overwrite``): header, data file and
    sidecar are one unit, and the old ``.raw`` leaves with the old header."""
    path = tmp_path / "labels.mhd"
    _user_pair(path, _labels(3))
    new = np.where(_labels(3) > 0, _labels(3), 2).astype(np.uint8)  # white matter in grey matter
    write_label_map(LabelMap(new, GRID, []), path, overwrite=True)
    assert _visible(tmp_path) == ["labels.json", "labels.mhd", "labels.zraw"]
    np.testing.assert_array_equal(read_label_map(path).array, new)


def test_a_failed_overwrite_puts_the_old_data_file_back(tmp_path, monkeypatch):
    """The old data file is removed as part of the unit: a move that fails half way (the header's) puts back the old
    header and its old data file, byte for byte, and leaves neither the new data file nor a temporary."""
    path = tmp_path / "a.mhd"
    before = _user_pair(path, _labels(3))
    real_replace = os.replace

    def fail_on_header(src, dst):
        if str(dst) == str(path) and not str(src).endswith(".old"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_header)
    with pytest.raises(OSError):
        write_image(GRID.image(_labels(5)), path, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_data_file_the_header_does_not_own_is_kept(tmp_path):
    """Only the header's own data file (its name with a data suffix, beside it, named by no other header) is
    removed: a header that names another image's data file, or one elsewhere, leaves that file alone, and so does
    a header whose data file a second header beside it reads too."""
    shared = tmp_path / "scan.raw"
    _user_pair(tmp_path / "scan.mhd", _labels(3))
    other = tmp_path / "other.mhd"
    other.write_text((tmp_path / "scan.mhd").read_text())  # ElementDataFile = scan.raw
    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    _user_pair(elsewhere / "b.mhd", _labels(3))
    far = tmp_path / "far.mhd"
    far.write_text((elsewhere / "b.mhd").read_text().replace("ElementDataFile = b.raw",
                                                             f"ElementDataFile = {elsewhere / 'b.raw'}"))
    assert str(elsewhere / "b.raw") in far.read_text()
    twin = tmp_path / "scan.nhdr"  # the same voxels through a detached NRRD header
    twin.write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {' '.join(map(str, GRID.size))}\n"
                    "encoding: raw\ndata file: scan.raw\n\n")
    for header in (other, far, tmp_path / "scan.mhd"):
        write_image(GRID.image(_labels(5)), header, overwrite=True)
    assert shared.is_file() and (elsewhere / "b.raw").is_file()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(twin))), _labels(3))


def test_a_killed_pair_write_leaves_a_folder_the_next_write_removes(tmp_path):
    """kill -9 during a direct ``.mhd`` write (after SimpleITK wrote the pair into the hidden folder beside it, before
    the moves) leaves that folder; the next write of that image removes it, as a label map's next write removes a
    killed write's staging folder.  A folder of a write still running is left alone."""
    path = tmp_path / "a.mhd"
    child = f"""
import os, signal, sys
import SimpleITK as sitk
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from MedSynthLib.schema.grid import Grid
from MedSynthLib.schema import volume_io

real = sitk.WriteImage
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
sitk.WriteImage = write_then_die
grid = Grid({GRID.size!r}, {GRID.spacing!r}, {GRID.origin!r}, {GRID.direction!r})
volume_io.write_image(grid.image(__import__("numpy").zeros(grid.shape, "uint8")), {str(path)!r})
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (left,) = _hidden(tmp_path)
    assert left.endswith(TMP_PAIR_SUFFIX) and not path.exists(), left
    running = tmp_path / f".{path.name}{STAGE_MARK}{os.getppid()}-live{TMP_PAIR_SUFFIX}"  # pytest's parent runs
    running.mkdir()
    write_image(GRID.image(_labels(5)), path)
    assert _hidden(tmp_path) == [running.name]
    assert _visible(tmp_path) == ["a.mhd", "a.zraw"]
