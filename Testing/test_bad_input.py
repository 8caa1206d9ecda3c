"""Every bad input gets one ``medsynth: error:`` line naming the file, exit status 2, no output.

The CLI is called in-process (``MedSynthLib.cli.main``) for the whole table and
through a real subprocess for two of the cases.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import phantom, write_volume
from MedSynthLib.cases.anatomy import derive_label_map
from MedSynthLib.cases.readers import read_case
from MedSynthLib.cli import main
from MedSynthLib.schema.labelmap import write_label_map

IMAGES, SEG = phantom()


def _write_case(folder: Path, suffix: str = ".nii.gz") -> Path:
    for modality, array in IMAGES.items():
        write_volume(array, folder / f"P_{modality}{suffix}")
    write_volume(SEG, folder / f"P_seg{suffix}")
    return folder


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A good phantom case, its label map and a label map of a tiny brain (written once)."""
    root = tmp_path_factory.mktemp("shared")
    case = _write_case(root / "good")
    labels = write_label_map(derive_label_map(read_case(case)), root / "labels.nii.gz")
    tiny = np.zeros(SEG.shape, np.uint8)
    tiny[18:23, 22:27, 20:25] = 3
    write_volume(tiny, root / "tiny.nii.gz")
    return {"root": root, "case": case, "labels": labels, "tiny": root / "tiny.nii.gz"}


def _copy_case(shared: dict[str, Path], tmp: Path) -> Path:
    return Path(shutil.copytree(shared["case"], tmp / "case"))


def _truncate(path: Path, fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# --- builders: (tmp, shared, out) -> (argv, path the message must name, expected words) -----------


def missing_modality(tmp, shared, out):
    case = _copy_case(shared, tmp)
    (case / "P_t2.nii.gz").unlink()
    return ["labels", case, "-o", out], case, "missing modality t2"


def unknown_naming(tmp, shared, out):
    case = tmp / "case"
    for name in ("scan_a.nii.gz", "scan_b.nii.gz"):
        write_volume(IMAGES["t1"], case / name)
    return ["labels", case, "-o", out], case, "unknown case naming"


def missing_folder(tmp, shared, out):
    return ["labels", tmp / "nowhere", "-o", out], tmp / "nowhere", "not found"


def missing_label_map(tmp, shared, out):
    return ["tumor", tmp / "gone.nii.gz", "--translate", "1", "0", "0", "-o", out], tmp / "gone.nii.gz", "not found"


def garbage_bytes(tmp, shared, out):
    case = _copy_case(shared, tmp)
    (case / "P_t2.nii.gz").write_bytes(np.random.default_rng(0).bytes(6000))
    return ["labels", case, "-o", out], case / "P_t2.nii.gz", "not a readable NIfTI"


def truncated_int16_gz(tmp, shared, out):
    case = _copy_case(shared, tmp)
    _truncate(case / "P_t2.nii.gz")
    return ["labels", case, "-o", out], case / "P_t2.nii.gz", "truncated"


def truncated_float32_gz(tmp, shared, out):
    case = _copy_case(shared, tmp)
    write_volume(IMAGES["flair"].astype(np.float32), case / "P_flair.nii.gz")
    _truncate(case / "P_flair.nii.gz")
    return ["labels", case, "-o", out], case / "P_flair.nii.gz", "truncated"


def truncated_data_intact_gzip(tmp, shared, out):
    """A complete gzip stream of a short NIfTI: SimpleITK alone would zero-fill it."""
    case = _copy_case(shared, tmp)
    path = case / "P_t1ce.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: int(len(raw) * 0.6)]))
    return ["labels", case, "-o", out], path, "truncated"


def truncated_uncompressed(tmp, shared, out):
    case = _write_case(tmp / "case", suffix=".nii")
    _truncate(case / "P_t1.nii")
    return ["labels", case, "-o", out], case / "P_t1.nii", "truncated"


def geometry_mismatch(tmp, shared, out):
    case = _copy_case(shared, tmp)
    write_volume(IMAGES["t2"], case / "P_t2.nii.gz", origin=(2.0, 0.0, 0.0))
    return ["labels", case, "-o", out], case / "P_t2.nii.gz", "origin"


def seg_value_outside_convention(tmp, shared, out):
    case = _copy_case(shared, tmp)
    write_volume(np.where(SEG == 4, 3, SEG).astype(np.uint8), case / "P_seg.nii.gz")
    return ["labels", case, "-o", out], case / "P_seg.nii.gz", "[3]"


def seg_fractional_values(tmp, shared, out):
    """A segmentation resampled with linear interpolation: its fractions are named, not truncated."""
    case = _copy_case(shared, tmp)
    write_volume(np.where(SEG == 2, 1.5, SEG).astype(np.float32), case / "P_seg.nii.gz")
    return ["labels", case, "-o", out], case / "P_seg.nii.gz", "non-integer label values (1.5)"


def label_map_value_outside_schema(tmp, shared, out):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(shared["labels"])))
    array[array == 6] = 7
    path = write_volume(array, tmp / "seven.nii.gz")
    return ["tumor", path, "--translate", "1", "0", "0", "-o", out], path, "[7]"


def _non_finite(value: float) -> Callable:
    def build(tmp, shared, out):
        case = _copy_case(shared, tmp)
        flair = IMAGES["flair"].astype(np.float32)
        flair[20, 24, 22] = value
        flair[5, 6, 7] = value
        write_volume(flair, case / "P_flair.nii.gz")
        return ["labels", case, "-o", out], case / "P_flair.nii.gz", "2 voxels are NaN or infinite"
    return build


def image_2d(tmp, shared, out):
    case = _copy_case(shared, tmp)
    sitk.WriteImage(sitk.GetImageFromArray(IMAGES["t2"][20]), str(case / "P_t2.nii.gz"), useCompression=True)
    return ["labels", case, "-o", out], case / "P_t2.nii.gz", "expected a 3D image, got 2D"


def label_map_4d(tmp, shared, out):
    image = sitk.ReadImage(str(shared["labels"]))
    path = tmp / "four_d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(path), useCompression=True)
    return ["tumor", path, "--translate", "1", "0", "0", "-o", out], path, "expected a 3D image, got 4D"


def empty_brain(tmp, shared, out):
    case = tmp / "case"
    for modality, array in IMAGES.items():
        write_volume(np.zeros_like(array), case / f"P_{modality}.nii.gz")
    return ["labels", case, "-o", out], case / "P_t1.nii.gz", "empty brain"


def edit_leaves_brain(tmp, shared, out):
    labels = shared["labels"]
    return ["tumor", labels, "--translate", "40", "0", "0", "-o", out], labels, "outside the brain"


def edit_past_the_grid(tmp, shared, out):
    labels = shared["labels"]
    return ["tumour", labels, "--translate", "1e300", "0", "0", "-o", out], labels, "larger than the grid's diagonal"


def insert_cannot_fit(tmp, shared, out):
    argv = ["tumor", "insert", "--from", shared["labels"], "--into", shared["tiny"], "-o", out]
    return argv, shared["tiny"], "cannot fit"


def parametric_centre_outside(tmp, shared, out):
    labels = shared["labels"]
    argv = ["tumor", "new", labels, "--center", "500", "0", "0", "--radius", "5", "-o", out]
    return argv, labels, "outside the brain"


def _grid_centre_ras(path: Path) -> list[str]:
    image = sitk.ReadImage(str(path))
    lps = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    return [str(-lps[0]), str(-lps[1]), str(lps[2])]


def oedema_past_the_grid(tmp, shared, out):
    # Issue 15: this margin grew to 22 GB before it was bounded against the grid.
    labels = shared["labels"]
    argv = ["tumour", "new", labels, "--centre", *_grid_centre_ras(labels), "--radius", "10", "--oedema", "1e9",
            "-o", out]
    return argv, labels, "oedema margin of 1e+09 mm is larger than the grid's diagonal"


def radius_not_finite(tmp, shared, out):
    labels = shared["labels"]
    argv = ["tumour", "new", labels, "--centre", *_grid_centre_ras(labels), "--radius", "nan", "-o", out]
    return argv, "--radius", "not a finite number"


def probability_above_one(tmp, shared, out):
    labels = shared["labels"]
    return ["tumour", "random", labels, "--seed", "1", "--p-new", "2", "-o", out], "--p-new", "must lie in [0, 1]"


def _raw_seg(tmp):
    return write_volume(SEG.astype(np.uint8), tmp / "raw_seg.nii.gz")  # BraTS values 0, 1, 2, 4


def raw_seg_as_insert_target(tmp, shared, out):
    """A tumour segmentation is a source an insert accepts (``--from``), never the brain it goes into."""
    path = _raw_seg(tmp)
    argv = ["tumour", "insert", "--from", shared["labels"], "--into", path, "-o", out]
    return argv, path, "not a MedSynth label map"


def raw_seg_into_new(tmp, shared, out):
    path = _raw_seg(tmp)
    return ["tumour", "new", path, "--centre", "0", "0", "0", "--radius", "5", "-o", out], path, \
        "not a MedSynth label map"


def mask_into_translate(tmp, shared, out):
    path = write_volume((SEG > 0).astype(np.uint8), tmp / "mask.nii.gz")
    return ["tumour", path, "--translate", "1", "0", "0", "-o", out], path, "medsynth labels"


def raw_seg_into_synthesize(tmp, shared, out):
    path = _raw_seg(tmp)
    return ["synthesize", path, "-o", tmp / "synth_out"], path, "not a MedSynth label map"


def _brats2023_seg(tmp):
    """A BraTS 2023-style tumour segmentation (1 NCR, 2 ED, 3 ET) on the BraTS 240 x 240 x 155 mm grid: its 3
    reads as white matter, so only its size tells it from a MedSynth label map."""
    seg = np.zeros((155, 240, 240), np.uint8)
    k, j, i = np.ogrid[:155, :240, :240]
    distance = np.sqrt((k - 80.0) ** 2 + (j - 110.0) ** 2 + (i - 140.0) ** 2)
    seg[distance < 25] = 2  # about 65 mL of oedema, enhancing rim and necrosis
    seg[distance < 14] = 3
    seg[distance < 9] = 1
    return write_volume(seg, tmp / "BraTS-GLI-00000-000-seg.nii.gz")


def brats2023_seg_into_synthesize(tmp, shared, out):
    path = _brats2023_seg(tmp)
    return ["synthesize", path, "-o", tmp / "synth_out"], path, "not a whole brain"


def brats2023_seg_into_translate(tmp, shared, out):
    path = _brats2023_seg(tmp)
    return ["tumour", path, "--translate", "5", "0", "0", "-o", out], path, "medsynth labels"


def image_as_label_map(tmp, shared, out):
    path = write_volume(np.arange(SEG.size, dtype=np.int16).reshape(SEG.shape) % 2000 - 100, tmp / "t1.nii.gz")
    return ["tumour", path, "--translate", "1", "0", "0", "-o", out], path, "distinct values outside"


def _no_tumour(tmp, shared):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(shared["labels"])))
    array[array >= 4] = 3
    return write_volume(array, tmp / "healthy.nii.gz")


def flip_about_brain_without_tumour(tmp, shared, out):
    path = _no_tumour(tmp, shared)
    argv = ["tumour", path, "--flip", "LR", "--flip-about", "brain", "-o", out]
    return argv, path, "no tumour to edit"


def scale_zero(tmp, shared, out):
    labels = shared["labels"]
    return ["tumour", labels, "--scale", "0", "-o", out], labels, "--scale"


def radius_zero(tmp, shared, out):
    labels = shared["labels"]
    return ["tumour", "new", labels, "--centre", *_grid_centre_ras(labels), "--radius", "0", "-o", out], labels, \
        "--radius"


def flip_about_without_flip(tmp, shared, out):
    labels = shared["labels"]
    return ["tumour", labels, "--translate", "1", "0", "0", "--flip-about", "brain", "-o", out], "--flip-about", \
        "--flip"


BAD_INPUTS = [
    missing_modality, unknown_naming, missing_folder, missing_label_map, garbage_bytes, truncated_int16_gz,
    truncated_float32_gz, truncated_data_intact_gzip, truncated_uncompressed, geometry_mismatch,
    seg_value_outside_convention, seg_fractional_values, label_map_value_outside_schema, image_2d, label_map_4d, empty_brain,
    edit_leaves_brain, edit_past_the_grid, insert_cannot_fit, parametric_centre_outside,
    oedema_past_the_grid, radius_not_finite, probability_above_one, raw_seg_as_insert_target, raw_seg_into_new,
    mask_into_translate, raw_seg_into_synthesize, brats2023_seg_into_synthesize, brats2023_seg_into_translate,
    image_as_label_map, flip_about_brain_without_tumour, scale_zero,
    radius_zero, flip_about_without_flip,
] + [pytest.param(_non_finite(v), id=f"non_finite_{n}") for n, v in (("nan", np.nan), ("inf", np.inf),
                                                                     ("neg_inf", -np.inf))]


def _hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_error_line(err: str, named: Path, words: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith("medsynth: error:"), line
    assert str(named) in line, f"{named} not named in {line!r}"
    assert words in line, f"{words!r} not in {line!r}"
    assert len(line) < 600, f"error line of {len(line)} characters"
    return line


def _run_in_process(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.mark.parametrize("build", BAD_INPUTS, ids=lambda b: getattr(b, "__name__", None))
def test_bad_input(build, tmp_path, shared, capsys):
    """One error line naming the file, exit 2, no output and the inputs untouched."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.nii.gz"
    argv, named, words = build(tmp_path, shared, out)
    before = _hashes(tmp_path, shared["root"])
    rc, err = _run_in_process(argv, capsys)
    assert rc == 2
    _assert_one_error_line(err, named, words)
    assert not out.exists() and not (out_dir / "result.json").exists()
    assert os.listdir(out_dir) == [], "stray files in the output folder"
    assert _hashes(tmp_path, shared["root"]) == before, "an input file changed"


def test_fractional_seg_does_not_point_at_label_convention(tmp_path, shared, capsys):
    """No convention reads 1.5: the line must not send the user to --label-convention."""
    out = tmp_path / "out" / "result.nii.gz"
    argv, named, words = seg_fractional_values(tmp_path, shared, out)
    rc, err = _run_in_process(argv, capsys)
    assert rc == 2
    line = _assert_one_error_line(err, named, words)
    assert "--label-convention" not in line and "[1]" not in line, line


def _medsynth_command() -> list[str]:
    for candidate in (shutil.which("medsynth"), Path(sys.executable).parent / "medsynth"):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    return [sys.executable, "-m", "MedSynthLib"]


@pytest.mark.parametrize("build", [missing_modality, truncated_data_intact_gzip], ids=lambda b: b.__name__)
def test_bad_input_subprocess(build, tmp_path, shared):
    """The installed console script reports the same way (no traceback, exit 2, no output)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.nii.gz"
    argv, named, words = build(tmp_path, shared, out)
    proc = subprocess.run(_medsynth_command() + [str(a) for a in argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    _assert_one_error_line(proc.stderr, named, words)
    assert proc.stdout == ""
    assert os.listdir(out_dir) == []


# --- outputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("executable", [False, True], ids=["plain_file", "executable_file"])
def test_output_under_a_file(tmp_path, shared, capsys, executable):
    """An output whose parent is a regular file fails cleanly (also as root, also if +x)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder\n")
    os.chmod(blocker, 0o755 if executable else 0o644)
    out = blocker / "x.nii.gz"
    rc, err = _run_in_process(["tumor", shared["labels"], "--translate", "1", "0", "0", "-o", out], capsys)
    assert rc == 2
    _assert_one_error_line(err, blocker, "not a folder")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("command", ["labels", "tumor", "demo"])
def test_read_only_output_folder(tmp_path, shared, capsys, command, monkeypatch):
    """A folder without write permission is refused before any work.

    As root, chmod does not stop writes, so ``os.access`` is made to report the
    folder read-only as it would for any other user.
    """
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            real_access = os.access

            def access(path, mode, *args, **kwargs):
                if Path(path) == folder and mode & os.W_OK:
                    return False
                return real_access(path, mode, *args, **kwargs)

            monkeypatch.setattr(os, "access", access)
        out = folder / ("demo" if command == "demo" else "x.nii.gz")
        argv = {"labels": ["labels", shared["case"], "-o", out],
                "tumor": ["tumor", shared["labels"], "--translate", "1", "0", "0", "-o", out],
                "demo": ["demo", "-o", out]}[command]
        rc, err = _run_in_process(argv, capsys)
        assert rc == 2
        _assert_one_error_line(err, folder, "not writable")
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("existing", ["image", "sidecar", "both"])
def test_existing_output_needs_overwrite(tmp_path, shared, capsys, existing):
    """Without --overwrite an existing output (or its sidecar) is kept; with it, it is replaced."""
    out = tmp_path / "result.nii.gz"
    sidecar = tmp_path / "result.json"
    if existing in ("image", "both"):
        shutil.copy(shared["labels"], out)
    if existing in ("sidecar", "both"):
        sidecar.write_text('{"old": true}\n')
    before = _hashes(tmp_path)
    argv = ["tumor", shared["labels"], "--translate", "5", "0", "0", "-o", out]
    rc, err = _run_in_process(argv, capsys)
    assert rc == 2
    _assert_one_error_line(err, out if existing != "sidecar" else sidecar, "already exists")
    assert _hashes(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted(Path(p).name for p in before)

    rc, err = _run_in_process(argv + ["--overwrite"], capsys)
    assert rc == 0 and err == ""
    assert sorted(os.listdir(tmp_path)) == ["result.json", "result.nii.gz"]
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(shared["labels"])))
    replaced = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert not np.array_equal(replaced, original), "the output was not replaced by the edit"
    assert '"translate"' in sidecar.read_text()


def test_demo_output_under_a_file(tmp_path, capsys):
    """``medsynth demo`` into a path below a file fails before building anything."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc, err = _run_in_process(["demo", "-o", blocker / "demo"], capsys)
    assert rc == 2
    _assert_one_error_line(err, blocker, "not a folder")
    assert os.listdir(tmp_path) == ["file.txt"]
