"""``tumour insert --from`` and ``tumour replay --source`` given a patient's case folder.

The Slicer module inserts a tumour from a case folder and records the case's segmentation file (its name and
content hash) as the insert's source.  On the command line both options took a file only: ``--source
CASE_FOLDER`` failed with "not a file", although the folder is what a user has in hand.  A case folder now
stands for its tumour segmentation file, read and named exactly as if that file had been given.

Its tumour is placed as the Slicer module places it: at the same position relative to the target's brain as it has
relative to the case's own brain (found in its scans), that centre recorded, so that a replay needs the
segmentation file only.  The command line used the segmentation alone, which has no brain: on another grid than
``--into`` (the template's, say) it asked for ``--centre``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSynthLib.cases.readers import read_case
from MedSynthLib.cli import main
from MedSynthLib.edits import InsertTumour
from MedSynthLib.edits.geometry import brain_centre
from MedSynthLib.schema.grid import LabelMap, lps_to_ras
from MedSynthLib.schema.labelmap import read_label_map, read_tumour_source, write_label_map
from MedSynthLib.schema.labels import Label
from MedSynthLib.schema.provenance import array_sha256
from test_edits import GRIDS, make_grid, synthetic_brain

GRID = make_grid(*GRIDS["iso"])
OTHER_GRID = make_grid(*GRIDS["aniso"], origin=(-20.0, 15.0, -10.0))  # e.g. the template's, not the case's
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


def _slicer_source(folder: Path) -> LabelMap:
    """What the Slicer module places a case folder's tumour by (``TumourTools.read_tumour_source``): the case's brain
    (read_case's, from its scans) filled with white matter, its tumour drawn in."""
    case = read_case(folder, require_segmentation=True)
    array = np.where(case.brain_mask(), int(Label.WM), 0).astype(np.uint8)
    array[case.tumour > 0] = case.tumour[case.tumour > 0]
    return LabelMap(array, case.grid, [])


def _placed_as_the_slicer_module_places_it(target: LabelMap, folder: Path) -> tuple[np.ndarray, tuple]:
    """The voxels and the recorded centre of the Slicer module's insert from ``folder`` into ``target``."""
    source = _slicer_source(folder)
    centre = tuple(float(v) for v in lps_to_ras(InsertTumour().placement_lps(target, source)))
    return InsertTumour()(target, source=source).array, centre


@pytest.fixture
def setup(tmp_path) -> dict[str, Path]:
    base = synthetic_brain(GRID, tumour_at=None)
    base.history.append({"name": "derive_labels", "params": {"convention": "brats2021"}})
    labels = write_label_map(base, tmp_path / "labels.nii.gz")
    (tmp_path / "cases").mkdir()
    case = _case_folder(tmp_path / "cases")
    return {"labels": labels, "case": case, "seg": case / "P001_seg.nii.gz"}


def test_insert_from_a_case_folder_records_its_segmentation_file(setup, tmp_path, capsys):
    # On the case's grid, a smaller brain than the case's: the placements by brain and by position differ.
    smaller = synthetic_brain(GRID, tumour_at=None, brain_fraction=0.38)
    smaller.history.append({"name": "derive_labels", "params": {"convention": "brats2021"}})
    labels = write_label_map(smaller, tmp_path / "smaller.nii.gz")
    via_file, via_folder = tmp_path / "via_file.nii.gz", tmp_path / "via_folder.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["seg"], "--into", labels, "-o", via_file)
    assert rc == 0, err
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", labels, "-o", via_folder)
    assert rc == 0, err
    by_file, by_folder = read_label_map(via_file), read_label_map(via_folder)
    record = by_folder.history[-1]["params"]
    # The same source (its file's name and content hash); the folder's tumour is placed by its brain (as the Slicer
    # module places it), the file's, which has no brain, where it lies on this same grid.
    assert {k: v for k, v in record.items() if k != "centre_ras_mm"} == \
        {k: v for k, v in by_file.history[-1]["params"].items() if k != "centre_ras_mm"}
    assert record["source"] == "P001_seg.nii.gz"
    assert record["source_labels_sha256"] == array_sha256(read_tumour_source(setup["seg"]).array)
    expected, centre = _placed_as_the_slicer_module_places_it(smaller, setup["case"])
    assert np.count_nonzero(expected != by_file.array) > 0
    np.testing.assert_array_equal(by_folder.array, expected)
    assert tuple(record["centre_ras_mm"]) == centre
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
    """On the case's own grid too, a case folder's tumour is placed by its brain (as in the Slicer module) and the
    insert replays from the segmentation file or the folder alike."""
    folder = brats_cases[1]
    seg_file = next(p for p in folder.iterdir() if p.name.endswith("_seg.nii.gz"))
    grid = read_tumour_source(seg_file).grid
    base = synthetic_brain(grid, tumour_at=None)
    base.history.append({"name": "derive_labels", "params": {"convention": "brats2021"}})
    labels = write_label_map(base, tmp_path / "labels.nii.gz")
    edited = tmp_path / "folder.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", folder, "--into", labels, "-o", edited)
    assert rc == 0, err
    by_folder = read_label_map(edited)
    assert by_folder.history[-1]["params"]["source"] == seg_file.name
    expected, centre = _placed_as_the_slicer_module_places_it(read_label_map(labels), folder)
    np.testing.assert_array_equal(by_folder.array, expected)
    assert tuple(by_folder.history[-1]["params"]["centre_ras_mm"]) == centre
    for n, source in enumerate((folder, seg_file)):
        rc, out, err = _run(capsys, "tumour", "replay", labels, "--edits", edited, "--source", source, "--check",
                            "-o", tmp_path / f"replayed{n}.nii.gz")
        assert rc == 0, err
        assert "identical to it voxel for voxel" in out


@pytest.mark.realdata
def test_a_brats_case_folder_inserts_into_the_template_and_replays(brats_cases, tmp_path, capsys):
    """The auditor's case: BraTS2021_00006 (240 x 240 x 155) into the template's map (another grid) was refused
    ('a tumour segmentation without a brain ... give --centre')."""
    folder = next(p for p in brats_cases if p.name == "BraTS2021_00006")
    template = tmp_path / "template_labels.nii.gz"
    assert _run(capsys, "tumour", "template", "-o", template)[0] == 0
    edited = tmp_path / "x.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", folder, "--into", template, "-o", edited)
    assert rc == 0, err
    inserted = read_label_map(edited)
    expected, centre = _placed_as_the_slicer_module_places_it(read_label_map(template), folder)
    np.testing.assert_array_equal(inserted.array, expected)
    assert tuple(inserted.history[-1]["params"]["centre_ras_mm"]) == centre
    assert inserted.history[-1]["params"]["source"] == "BraTS2021_00006_seg.nii.gz"
    rc, out, err = _run(capsys, "tumour", "replay", template, "--edits", edited, "--source", folder, "--check",
                        "-o", tmp_path / "replayed.nii.gz")
    assert rc == 0 and "identical to it voxel for voxel" in out, err
    np.testing.assert_array_equal(read_label_map(tmp_path / "replayed.nii.gz").array, inserted.array)


@pytest.fixture
def other_grid(tmp_path) -> Path:
    """A label map on another grid than the case folder's (another spacing, origin and brain size)."""
    base = synthetic_brain(OTHER_GRID, tumour_at=None, brain_fraction=0.36)
    base.history.append({"name": "derive_labels", "params": {"convention": "brats2021"}})
    return write_label_map(base, tmp_path / "other_labels.nii.gz")


def test_a_case_folder_on_another_grid_is_placed_by_its_brain_and_replays(setup, other_grid, tmp_path, capsys):
    edited = tmp_path / "edited.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", other_grid, "-o", edited)
    assert rc == 0, err
    inserted = read_label_map(edited)
    expected, centre = _placed_as_the_slicer_module_places_it(read_label_map(other_grid), setup["case"])
    assert np.count_nonzero(expected >= Label.NCR) > 50
    np.testing.assert_array_equal(inserted.array, expected)
    record = inserted.history[-1]["params"]
    assert tuple(record["centre_ras_mm"]) == centre
    assert record["source"] == "P001_seg.nii.gz"
    assert record["source_labels_sha256"] == array_sha256(read_tumour_source(setup["seg"]).array)
    for n, source in enumerate((setup["case"], setup["seg"])):  # the centre is recorded: the file alone replays it
        replayed = tmp_path / f"replayed{n}.nii.gz"
        rc, out, err = _run(capsys, "tumour", "replay", other_grid, "--edits", edited, "--source", source, "--check",
                            "-o", replayed)
        assert rc == 0 and "identical to it voxel for voxel" in out, err
        np.testing.assert_array_equal(read_label_map(replayed).array, inserted.array)


def test_the_slicer_modules_own_insert_gives_the_same_map_and_record(setup, other_grid, tmp_path, capsys):
    """The module's TumourTools.insert_tumour itself (its MRML plumbing stubbed: the label map in, the edit applied)."""
    import sys
    import types

    try:
        import slicer  # noqa: F401

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSynth"))
        from MedSynthSlicerLib.tumour_tools import TumourTools
    except ImportError as exc:
        pytest.skip(f"slicer-core is not installed ({exc})")
    target = read_label_map(other_grid)

    class Module(TumourTools):
        log = types.SimpleNamespace(emit=lambda message: None)

        def labelmap(self, segmentation):
            return target

        def apply_edit(self, segmentation, edit, **kwargs):
            return edit(target, **kwargs)

    by_module = Module().insert_tumour(None, setup["case"])
    edited = tmp_path / "edited.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", other_grid, "-o", edited)
    assert rc == 0, err
    by_cli = read_label_map(edited)
    np.testing.assert_array_equal(by_cli.array, by_module.array)
    assert by_cli.history[-1] == json.loads(json.dumps(by_module.history[-1]))


def test_a_plain_segmentation_on_another_grid_still_asks_for_a_centre(setup, other_grid, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["seg"], "--into", other_grid, "-o", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--centre" in err and "P001_seg.nii.gz" in err, err
    assert not out.exists()


def test_a_scan_that_cannot_join_the_brain_is_left_out_with_a_notice(setup, other_grid, tmp_path, capsys):
    """A scan on another grid than the segmentation (which reading the whole case refuses) is left out of the brain the
    place is found in, and named; the others show the same brain."""
    expected, centre = _placed_as_the_slicer_module_places_it(read_label_map(other_grid), setup["case"])
    flair = setup["case"] / "P001_flair.nii.gz"
    image = sitk.ReadImage(str(flair))
    image.SetSpacing(tuple(s * 2 for s in image.GetSpacing()))
    sitk.WriteImage(image, str(flair))
    edited = tmp_path / "edited.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", other_grid, "-o", edited)
    assert rc == 0, err
    assert "P001_flair.nii.gz" in err and "grid" in err, err
    np.testing.assert_array_equal(read_label_map(edited).array, expected)
    assert tuple(read_label_map(edited).history[-1]["params"]["centre_ras_mm"]) == centre


def test_a_case_folder_with_no_scan_on_its_segmentations_grid_is_refused(setup, other_grid, tmp_path, capsys):
    for modality in ("t1", "t1ce", "t2", "flair"):
        path = setup["case"] / f"P001_{modality}.nii.gz"
        image = sitk.ReadImage(str(path))
        image.SetOrigin(tuple(o + 40.0 for o in image.GetOrigin()))
        sitk.WriteImage(image, str(path))
    out = tmp_path / "out.nii.gz"
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", other_grid, "-o", out)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(setup["case"]) in lines[0] and "--centre" in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_with_a_centre_the_scans_are_not_read(setup, other_grid, tmp_path, capsys):
    """--centre places the tumour: the case's brain plays no part, so a scan MedSynth cannot read does not stop it."""
    (setup["case"] / "P001_t1.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out.nii.gz"
    centre = lps_to_ras(brain_centre(read_label_map(other_grid)))
    rc, _, err = _run(capsys, "tumour", "insert", "--from", setup["case"], "--into", other_grid,
                      "--centre", *(f"{v:.3f}" for v in centre), "-o", out)
    assert rc == 0, err
    assert read_label_map(out).history[-1]["params"]["source"] == "P001_seg.nii.gz"


def test_a_case_folder_stands_for_its_segmentation_file_on_the_same_grid_with_a_centre(setup, tmp_path, capsys):
    """With --centre, a case folder and its segmentation file give the same map and record (only the file is read)."""
    flair = setup["case"] / "P001_flair.nii.gz"
    image = sitk.ReadImage(str(flair))
    image.SetSpacing(tuple(s * 2 for s in image.GetSpacing()))
    sitk.WriteImage(image, str(flair))
    centre = tuple(f"{v:g}" for v in lps_to_ras(GRID.index_to_lps(np.array([30.0, 28.0, 25.0]))))
    made = {}
    for name, source in (("folder", setup["case"]), ("file", setup["seg"])):
        made[name] = tmp_path / f"from_{name}.nii.gz"
        rc, _, err = _run(capsys, "tumour", "insert", "--from", source, "--into", setup["labels"], "--centre", *centre,
                          "-o", made[name])
        assert rc == 0, err
    by_folder, by_file = read_label_map(made["folder"]), read_label_map(made["file"])
    assert array_sha256(by_folder.array) == array_sha256(by_file.array)
    assert by_folder.history[-1] == by_file.history[-1]
