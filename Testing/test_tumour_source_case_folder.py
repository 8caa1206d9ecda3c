"""``tumour insert --from`` and ``tumour replay --source`` given a patient's case folder.

The Slicer module inserts a tumour from a case folder and records the case's segmentation file (its name and
content hash) as the insert's source.  On the command line both options took a file only: ``--source
CASE_FOLDER`` failed with "not a file", although the folder is what a user has in hand.  A case folder now
stands for its tumour segmentation file, read and named exactly as if that file had been given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSynthLib.cli import main
from MedSynthLib.schema.labelmap import read_label_map, read_tumour_source, write_label_map
from MedSynthLib.schema.labels import Label
from MedSynthLib.schema.provenance import array_sha256
from test_edits import GRIDS, make_grid, synthetic_brain

GRID = make_grid(*GRIDS["iso"])
BRATS_VALUES = {Label.NCR: 1, Label.ED: 2, Label.ET: 4}  # BraTS 2021's tumour labels


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _case_folder(root: Path, name: str = "P001", with_seg: bool = True) -> Path:
    """A BraTS 2021-named case folder (stand-in scans) whose segmentation holds another brain's tumour."""
    folder = root / name
    folder.mkdir()
    donor = synthetic_brain(GRID, tumour_at=(0.4, 0.45, 0.55), radii_mm=(3.0, 5.0, 8.0)).array
    for n, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        sitk.WriteImage(GRID.image((donor * (100.0 + n)).astype(np.float32)), str(folder / f"{name}_{modality}.nii.gz"))
    if with_seg:
        seg = np.zeros(GRID.shape, np.uint8)
        for label, value in BRATS_VALUES.items():
            seg[donor == label] = value
        sitk.WriteImage(GRID.image(seg), str(folder / f"{name}_seg.nii.gz"))
    return folder


@pytest.fixture
def setup(tmp_path) -> dict[str, Path]:
    base = synthetic_brain(GRID, tumour_at=None)
    base.history.append({"name": "derive_labels", "params": {"convention": "brats2021"}})
    labels = write_label_map(base, tmp_path / "labels.nii.gz")
    (tmp_path / "cases").mkdir()
    case = _case_folder(tmp_path / "cases")
    return {"labels": labels, "case": case, "seg": case / "P001_seg.nii.gz"}


def test_insert_from_a_case_folder_records_its_segmentation_file(setup, tmp_path, capsys):
    via_file, via_folder = tmp_path / "via_file.nii.gz", tmp_path / "via_folder.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["seg"], "--into", setup["labels"], "-o", via_file)
    assert rc == 0, err
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", setup["labels"], "-o", via_folder)
    assert rc == 0, err
    by_file, by_folder = read_label_map(via_file), read_label_map(via_folder)
    record = by_folder.history[-1]["params"]
    assert record == by_file.history[-1]["params"]
    assert record["source"] == "P001_seg.nii.gz"
    assert record["source_labels_sha256"] == array_sha256(read_tumour_source(setup["seg"]).array)
    np.testing.assert_array_equal(by_folder.array, by_file.array)
    assert np.count_nonzero(by_folder.array >= Label.NCR) > 100
    assert str(setup["case"]) not in json.dumps(by_folder.history)  # no path in provenance


def test_replay_takes_the_case_folder_as_source(setup, tmp_path, capsys):
    edited = tmp_path / "edited.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", setup["labels"], "-o", edited)
    assert rc == 0, err
    for n, source in enumerate((setup["case"], setup["seg"])):
        rc, out, err = _run(capsys, "tumour", "replay", setup["labels"], "--edits", edited, "--source", source,
                            "--check", "-o", tmp_path / f"replayed{n}.nii.gz")
        assert rc == 0, err
        assert "identical to it voxel for voxel" in out


def test_replay_refuses_a_case_folder_and_its_file_together(setup, tmp_path, capsys):
    edited = tmp_path / "edited.nii.gz"
    assert _run(capsys, "tumour", "insert", "--from", setup["seg"], "--into", setup["labels"], "-o", edited)[0] == 0
    out = tmp_path / "replayed.nii.gz"
    rc, _, err = _run(capsys, "tumour", "replay", setup["labels"], "--edits", edited, "--source", setup["case"],
                      "--source", setup["seg"], "-o", out)
    assert rc == 2 and "P001_seg.nii.gz" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_case_folder_without_a_segmentation_is_refused_in_one_line(setup, tmp_path, capsys):
    bare = _case_folder(tmp_path, "P002", with_seg=False)
    edited = tmp_path / "edited.nii.gz"
    assert _run(capsys, "tumour", "insert", "--from", setup["seg"], "--into", setup["labels"], "-o", edited)[0] == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["tumour", "insert", "--from", bare, "--into", setup["labels"], "-o", tmp_path / "out.nii.gz"],
                 ["tumour", "replay", setup["labels"], "--edits", edited, "--source", bare,
                  "-o", tmp_path / "out.nii.gz"]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(bare) in lines[0] and "segmentation" in lines[0], err
        assert "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_folder_that_is_no_case_is_refused_in_one_line(setup, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    rc, _, err = _run(capsys, "tumour", "insert", "--from", plain, "--into", setup["labels"],
                      "-o", tmp_path / "out.nii.gz")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(plain) in err and "case folder" in err, err
    assert not (tmp_path / "out.nii.gz").exists()


def test_the_output_is_not_written_into_the_source_case_folder(setup, capsys):
    out = setup["case"] / "inserted.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", setup["labels"], "-o", out)
    assert rc == 2 and "case folder" in err, err
    assert not out.exists()


@pytest.mark.realdata
def test_a_brats_case_folder_inserts_and_replays_as_its_seg_file(brats_cases, tmp_path, capsys):
    folder = brats_cases[1]
    seg_file = next(p for p in folder.iterdir() if p.name.endswith("_seg.nii.gz"))
    grid = read_tumour_source(seg_file).grid
    base = synthetic_brain(grid, tumour_at=None)
    base.history.append({"name": "derive_labels", "params": {"convention": "brats2021"}})
    labels = write_label_map(base, tmp_path / "labels.nii.gz")
    edited = {}
    for name, source in (("file", seg_file), ("folder", folder)):
        edited[name] = tmp_path / f"{name}.nii.gz"
        rc, _, err = _run(capsys, "tumour", "insert", "--from", source, "--into", labels, "-o", edited[name])
        assert rc == 0, err
    by_file, by_folder = read_label_map(edited["file"]), read_label_map(edited["folder"])
    assert by_folder.history[-1]["params"]["source"] == seg_file.name
    assert by_folder.history[-1]["params"] == by_file.history[-1]["params"]
    np.testing.assert_array_equal(by_folder.array, by_file.array)
    rc, out, err = _run(capsys, "tumour", "replay", labels, "--edits", edited["file"], "--source", folder, "--check",
                        "-o", tmp_path / "replayed.nii.gz")
    assert rc == 0, err
    assert "identical to it voxel for voxel" in out


def test_a_case_folder_stands_for_its_segmentation_without_its_scans_being_read(setup, tmp_path, capsys):
    """Only the segmentation of a source case folder is used: a scan MedSynth could not read with the others (here a
    FLAIR on another grid, which reading the whole case refuses) must not stop the insert, nor be named in a refusal."""
    flair = setup["case"] / "P001_flair.nii.gz"
    image = sitk.ReadImage(str(flair))
    image.SetSpacing(tuple(s * 2 for s in image.GetSpacing()))
    sitk.WriteImage(image, str(flair))
    from_folder = tmp_path / "from_folder.nii.gz"
    from_file = tmp_path / "from_file.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", setup["labels"], "-o", from_folder)
    assert rc == 0, err
    assert _run(capsys, "tumour", "insert", "--from", setup["seg"], "--into", setup["labels"], "-o", from_file)[0] == 0
    assert array_sha256(read_label_map(from_folder).array) == array_sha256(read_label_map(from_file).array)
