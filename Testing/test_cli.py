"""Tests of the ``medsynth`` command line on a phantom case and the built-in template.

Commands run in-process through ``MedSynthLib.cli.main``; the expensive steps
(deriving a label map, the demo) run once per module and are shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import phantom, run_cli as run, write_volume
from MedSynthLib.cli import main
from MedSynthLib.edits import replay, tumour_centre
from MedSynthLib.schema.grid import Grid, lps_to_ras
from MedSynthLib.schema.labelmap import read_label_map
from MedSynthLib.schema.labels import label_counts
from MedSynthLib.schema.provenance import array_sha256

IMAGES, SEG = phantom()
#: Oblique LPS-flipped direction (15 degrees about z).
_A = np.deg2rad(15.0)
DIRECTION = tuple(float(v) for v in (np.array([[np.cos(_A), -np.sin(_A), 0], [np.sin(_A), np.cos(_A), 0], [0, 0, 1]])
                                     @ np.diag([-1.0, -1.0, 1.0])).ravel())
GEOMETRY = dict(spacing=(0.9, 1.1, 1.3), origin=(10.0, -20.0, 5.0), direction=DIRECTION)
#: A patient-like folder name that must never reach a provenance record.
CASE_NAME = "Patient_ZX81"


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A phantom case on an oblique grid and its label map written by ``medsynth labels``."""
    root = tmp_path_factory.mktemp("cli")
    case = root / CASE_NAME
    for modality, array in IMAGES.items():
        write_volume(array, case / f"{CASE_NAME}_{modality}.nii.gz", **GEOMETRY)
    write_volume(SEG, case / f"{CASE_NAME}_seg.nii.gz", **GEOMETRY)
    labels = root / "out" / "labels.nii.gz"
    assert main(["labels", str(case), "-o", str(labels)]) == 0
    return {"root": root, "case": case, "labels": labels, "t1": case / f"{CASE_NAME}_t1.nii.gz"}


def _brain_centre_ras(path: Path) -> list[str]:
    """RAS mm of the brain's centre voxel, as CLI arguments."""
    labelmap = read_label_map(path)
    kji = np.argwhere(labelmap.array > 0).mean(axis=0)
    ras = lps_to_ras(labelmap.grid.index_to_lps(kji[::-1]))
    return [f"{v:.3f}" for v in ras]


# --- help --------------------------------------------------------------------------------------

HELP = [[], ["info"], ["labels"], ["tumour"], ["tumour", "transform"], ["tumour", "insert"], ["tumour", "new"],
        ["tumour", "random"], ["tumor"], ["tumor", "new"], ["demo"]]


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "medsynth")
def test_help(command, capsys):
    """``--help`` of every command prints its usage and exits 0."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: medsynth")
    # `tumor` is an alias: its usage names the command `tumour`.
    assert " ".join(["medsynth"] + [{"tumor": "tumour"}.get(w, w) for w in command]) in out.splitlines()[0]


def test_help_subprocess():
    """The installed entry point answers ``--help`` with exit 0 and lists the commands."""
    proc = subprocess.run([sys.executable, "-m", "MedSynthLib", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("info", "labels", "tumor", "demo"):
        assert command in proc.stdout


def test_usage_error_is_one_line(capsys):
    """A usage mistake is one error line and exit 2, like bad input."""
    rc, out, err = run(["tumor", "new", "x.nii.gz", "--radius", "5", "-o", "y.nii.gz"], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("medsynth: error:") and len(err.splitlines()) == 1 and "--center" in err


@pytest.mark.parametrize("argv, command", [
    (["train", "--data", "d", "-o", "out", "--overwrite"], "medsynth train"),
    (["evaluate", "case", "-o", "r.json", "--bogus"], "medsynth evaluate"),
    (["tumour", "in.nii.gz", "--translate", "1", "0", "0", "-o", "out.nii.gz", "--radius", "3"],
     "medsynth tumour transform"),
    (["tumor", "new", "in.nii.gz", "--center", "1", "2", "3", "--radius", "3", "-o", "o.nii.gz", "--bogus"],
     "medsynth tumour new"),
])
def test_an_option_a_command_lacks_names_the_command_once(argv, command, capsys):
    """Options argparse does not know surface at the top-level parser: the line names the command, once."""
    rc, out, err = run(argv, capsys)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"medsynth: error: {command}: unrecognized arguments: "), err
    assert err.count("medsynth") == 2, err


# --- info ----------------------------------------------------------------------------------------


def test_info_text(work, capsys):
    """``medsynth info`` prints convention, modalities, grid and tumour counts."""
    rc, out, err = run(["info", work["case"]], capsys)
    assert rc == 0 and err == ""
    assert "convention  brats2021" in out
    assert "size (44, 48, 40)" in out
    assert f"{CASE_NAME}_t1ce.nii.gz" in out
    assert f"NCR {(SEG == 1).sum()}, ED {(SEG == 2).sum()}, ET {(SEG == 4).sum()}" in out


def test_info_prints_the_grid_in_ras_as_slicer_shows_it(work, capsys):
    """The origin and axes ``info`` prints are RAS, labelled, as 3D Slicer and every edit vector are (ITK's LPS,
    unlabelled, read as the opposite side); ``--json`` keeps ITK's grid and adds the RAS pair."""
    origin_ras = lps_to_ras(GEOMETRY["origin"])
    direction_ras = (np.diag([-1.0, -1.0, 1.0]) @ np.reshape(DIRECTION, (3, 3))).ravel()
    rc, out, _ = run(["info", work["case"]], capsys)
    assert rc == 0
    assert "origin (" + ", ".join(f"{v + 0.0:.6g}" for v in origin_ras) + ") mm RAS" in out
    assert "direction (" + ", ".join(f"{v + 0.0:.6g}" for v in direction_ras) + ") RAS" in out
    rc, out, _ = run(["info", work["case"], "--json"], capsys)
    ras = json.loads(out)["grid_ras"]
    assert np.allclose(ras["origin"], origin_ras) and np.allclose(ras["direction"], direction_ras)


def test_a_grid_mismatch_is_reported_in_ras(tmp_path, capsys):
    """A T2 moved 2 mm towards the patient's right (RAS x -2) is reported as such, labelled RAS, not as
    ITK's LPS +2 (the other side)."""
    case = tmp_path / "Patient_grid"
    plain = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    for modality, array in IMAGES.items():
        moved = dict(plain, origin=(2.0, 0.0, 0.0)) if modality == "t2" else plain  # LPS x +2 = RAS x -2
        write_volume(array, case / f"Patient_grid_{modality}.nii.gz", **moved)
    write_volume(SEG, case / "Patient_grid_seg.nii.gz", **plain)
    rc, _, err = run(["info", case], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "origin (-2, 0, 0) differs from (0, 0, 0) (RAS mm)" in err, err


def test_info_json(work, capsys):
    """``medsynth info --json`` parses and carries the exact grid."""
    rc, out, _ = run(["info", work["case"], "--json"], capsys)
    assert rc == 0
    info = json.loads(out)
    assert info["convention"] == "brats2021" and info["label_convention"] == "brats2021"
    assert Grid.from_json(info["grid"]) == Grid.from_image(sitk.ReadImage(str(work["t1"])))
    assert info["tumour_voxels"] == {"NCR": int((SEG == 1).sum()), "ED": int((SEG == 2).sum()),
                                     "ET": int((SEG == 4).sum())}
    assert set(info["modalities"]) == {"t1", "t1ce", "t2", "flair", "seg"}
    assert info["brain_voxels"] > 0


# --- labels --------------------------------------------------------------------------------------


def test_labels_output(work):
    """uint8 values 0-6 on the exact input grid; tumour copied from the segmentation."""
    image = sitk.ReadImage(str(work["labels"]))
    assert image.GetPixelID() == sitk.sitkUInt8
    assert Grid.from_image(image) == Grid.from_image(sitk.ReadImage(str(work["t1"])))
    array = sitk.GetArrayFromImage(image)
    assert set(np.unique(array)) == set(range(7))
    expected_tumour = np.select([SEG == 1, SEG == 2, SEG == 4], [4, 5, 6], 0)
    np.testing.assert_array_equal(np.where(array >= 4, array, 0), expected_tumour)


def test_labels_sidecar(work):
    """The sidecar records derive_labels, hashes the array and holds no input path or name."""
    sidecar = work["labels"].with_name("labels.json")
    text = sidecar.read_text()
    meta = json.loads(text)
    assert meta["kind"] == "medsynth-label-map" and meta["schema_version"] == 1
    assert meta["history"][0]["name"] == "derive_labels"
    assert meta["history"][0]["params"]["convention"] == "brats2021"
    assert meta["labels_sha256"] == array_sha256(_array(work["labels"]))
    for leak in (str(work["case"]), str(work["root"]), CASE_NAME):
        assert leak not in text, f"{leak!r} leaked into the sidecar"
    assert not [s for s in _strings(meta) if os.path.isabs(s)], "an absolute path in the sidecar"


def _strings(value) -> list[str]:
    """Every string (keys and values) inside a JSON document."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# --- tumour edits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chained(work) -> tuple[Path, Path]:
    """``tumor L --translate 5 0 0 -o out`` then ``tumor out --rotate 0 0 20 -o out2``."""
    out = work["root"] / "edits" / "moved.nii.gz"
    out2 = work["root"] / "edits" / "moved_rotated.nii.gz"
    assert main(["tumor", str(work["labels"]), "--translate", "5", "0", "0", "-o", str(out)]) == 0
    assert main(["tumor", str(out), "--rotate", "0", "0", "20", "-o", str(out2)]) == 0
    return out, out2


def test_translate_moves_tumour(work, chained):
    """The tumour centre moves 5 mm along RAS x; the brain mask is unchanged."""
    before, after = read_label_map(work["labels"]), read_label_map(chained[0])
    shift = lps_to_ras(tumour_centre(after)) - lps_to_ras(tumour_centre(before))
    np.testing.assert_allclose(shift, (5.0, 0.0, 0.0), atol=1.0)
    np.testing.assert_array_equal(after.array == 0, before.array == 0)


def test_edit_history_and_replay(work, chained):
    """out2.json lists derive_labels, translate, rotate in order; replaying gives the same array."""
    history = _sidecar(chained[1])["history"]
    assert [r["name"] for r in history] == ["derive_labels", "translate", "rotate"]
    assert history[1]["params"]["offset_ras_mm"] == [5.0, 0.0, 0.0]
    assert history[2]["params"]["angles_deg"] == [0.0, 0.0, 20.0]
    replayed = replay(read_label_map(work["labels"]), history[1:])
    np.testing.assert_array_equal(replayed.array, _array(chained[1]))
    assert replayed.history == history


def test_tumor_new(work, capsys):
    """``tumor new`` draws NCR, ET and ED at the centre and replays exactly."""
    out = work["root"] / "new" / "new.nii.gz"
    centre = _brain_centre_ras(work["labels"])
    rc, stdout, err = run(["tumor", "new", work["labels"], "--center", *centre, "--radius", "6",
                           "--oedema", "4", "--seed", "7", "-o", out], capsys)
    assert rc == 0 and err == "" and str(out) in stdout
    array = _array(out)
    assert {4, 5, 6} <= set(np.unique(array))
    history = _sidecar(out)["history"]
    assert history[-1]["name"] == "parametric_tumour" and history[-1]["params"]["seed"] == 7
    np.testing.assert_array_equal(replay(read_label_map(work["labels"]), history[1:]).array, array)


def test_tumour_and_centre_are_aliases_of_tumor_and_center(work, capsys):
    """One command, two spellings: ``tumour``/``--centre`` and ``tumor``/``--center`` write the same map."""
    centre = _brain_centre_ras(work["labels"])
    arrays = []
    for command, option in (("tumour", "--centre"), ("tumor", "--center")):
        out = work["root"] / "spelling" / f"{command}.nii.gz"
        rc, _, err = run([command, "new", work["labels"], option, *centre, "--radius", "6", "--seed", "3", "-o", out],
                         capsys)
        assert rc == 0 and err == ""
        arrays.append(_array(out))
        assert _sidecar(out)["history"][-1]["params"]["centre_ras_mm"] == [float(v) for v in centre]
    np.testing.assert_array_equal(arrays[0], arrays[1])


def test_tumor_insert(work, capsys):
    """``tumor insert`` records the source by file name (not path) and content hash, and replays exactly."""
    out = work["root"] / "insert" / "inserted.nii.gz"
    rc, _, err = run(["tumor", "insert", "--from", work["labels"], "--into", work["labels"], "-o", out], capsys)
    assert rc == 0 and err == ""
    array = _array(out)
    assert (array >= 4).any()
    text = out.with_name("inserted.json").read_text()
    assert str(work["root"]) not in text
    history = json.loads(text)["history"]
    source = read_label_map(work["labels"])
    # The source's identity: its file name (the replay key) and its content hash.
    assert history[-1]["name"] == "insert_tumour" and history[-1]["params"]["source"] == "labels.nii.gz"
    assert history[-1]["params"]["source_labels_sha256"] == array_sha256(source.array)
    replayed = replay(source, history[1:], sources={"labels.nii.gz": source})
    np.testing.assert_array_equal(replayed.array, array)
    from MedSynthLib.schema.provenance import parse_step

    exported = parse_step(history[-1]).to_json(for_export=True)["params"]
    assert "source" not in exported and "source_labels_sha256" not in exported  # may identify a patient's map


def _recoded_seg(work: dict[str, Path], path: Path, values: dict[int, int]) -> Path:
    """The phantom's BraTS segmentation written with other tumour values (BraTS 1/2/4 -> ``values``)."""
    recoded = np.zeros_like(SEG)
    for src, dst in values.items():
        recoded[SEG == src] = dst
    write_volume(recoded, path, **GEOMETRY)
    return path


@pytest.mark.parametrize("values, convention", [({1: 1, 2: 2, 4: 4}, []), ({1: 2, 2: 1, 4: 3}, []),
                                                 ({1: 2, 2: 1, 4: 3}, ["--label-convention", "msd"])],
                         ids=["brats2021", "msd_detected", "msd_named"])
def test_tumour_insert_takes_an_expert_tumour_segmentation(work, capsys, tmp_path, values, convention):
    """``--from`` a plain tumour segmentation (a BraTS ``*_seg``, an MSD label map; no brain, no sidecar): its tumour
    lands at its own place on the same grid, read in its own convention, and ``tumour replay`` takes it back."""
    seg = _recoded_seg(work, tmp_path / "expert_seg.nii.gz", values)
    out = tmp_path / "inserted.nii.gz"
    rc, _, err = run(["tumour", "insert", "--from", seg, "--into", work["labels"], *convention, "-o", out], capsys)
    assert rc == 0, err
    array = _array(out)
    expected = np.select([SEG == 1, SEG == 2, SEG == 4], [4, 5, 6], 0)
    np.testing.assert_array_equal(np.where(array >= 4, array, 0), expected)
    history = _sidecar(out)["history"]
    assert history[-1]["params"]["source"] == "expert_seg.nii.gz"
    again = tmp_path / "again.nii.gz"
    rc, _, err = run(["tumour", "replay", work["labels"], "--edits", out, "--source", seg, *convention, "--check",
                      "-o", again], capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(_array(again), array)


def test_tumour_insert_of_an_expert_segmentation_that_reads_two_ways_is_one_line(work, capsys, tmp_path):
    seg = _recoded_seg(work, tmp_path / "only_core_and_et.nii.gz", {1: 1, 4: 3})  # BraTS 2023 core or MSD oedema?
    out = tmp_path / "inserted.nii.gz"
    rc, _, err = run(["tumour", "insert", "--from", seg, "--into", work["labels"], "-o", out], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and str(seg) in err and "--label-convention" in err, err
    assert not out.exists()


def test_tumour_insert_of_a_brainless_tumour_on_another_grid_needs_a_centre(work, capsys, tmp_path):
    """Without a brain there is no relative position to match: the tumour goes where --centre says."""
    seg = tmp_path / "other_grid_seg.nii.gz"
    write_volume(SEG, seg, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    out = tmp_path / "inserted.nii.gz"
    rc, _, err = run(["tumour", "insert", "--from", seg, "--into", work["labels"], "-o", out], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--centre" in err, err
    assert not out.exists()
    centre = _brain_centre_ras(work["labels"])
    rc, _, err = run(["tumour", "insert", "--from", seg, "--into", work["labels"], "--centre", *centre, "-o", out],
                     capsys)
    assert rc == 0, err
    assert (_array(out) == 6).any()


def test_tumor_random_is_reproducible(work, capsys):
    """``tumor random --seed 3`` twice gives identical maps and histories, and replays."""
    outs = [work["root"] / "random" / f"r{n}.nii.gz" for n in (1, 2)]
    for out in outs:
        rc, _, err = run(["tumor", "random", work["labels"], "--seed", "3", "-o", out], capsys)
        assert rc == 0 and err == ""
    first, second = (_array(p) for p in outs)
    np.testing.assert_array_equal(first, second)
    history = _sidecar(outs[0])["history"]
    assert history == _sidecar(outs[1])["history"]
    assert len(history) >= 2 and history[0]["name"] == "derive_labels"
    np.testing.assert_array_equal(replay(read_label_map(work["labels"]), history[1:]).array, first)


def test_tumour_replay_reproduces_an_edit_chain(work, chained, capsys):
    """``tumour replay BASE --edits EDITED`` applies the edits EDITED's sidecar records after BASE's history and
    checks the result against EDITED's voxels."""
    out = work["root"] / "replay" / "chain.nii.gz"
    rc, stdout, err = run(["tumour", "replay", work["labels"], "--edits", chained[1], "--check", "-o", out], capsys)
    assert rc == 0 and err == "", err
    assert "2 edits replayed (translate, rotate)" in stdout and "identical to" in stdout
    np.testing.assert_array_equal(_array(out), _array(chained[1]))
    assert _sidecar(out)["history"] == _sidecar(chained[1])["history"]


def test_tumour_replay_of_an_insert_takes_its_source(work, capsys):
    inserted = work["root"] / "replay_insert" / "inserted.nii.gz"
    assert run(["tumor", "insert", "--from", work["labels"], "--into", work["labels"], "-o", inserted], capsys)[0] == 0
    out = work["root"] / "replay_insert" / "again.nii.gz"
    rc, _, err = run(["tumour", "replay", work["labels"], "--edits", inserted, "-o", out], capsys)
    assert rc == 2 and "--source" in err and "labels.nii.gz" in err and len(err.splitlines()) == 1
    assert not out.exists()
    rc, _, err = run(["tumour", "replay", work["labels"], "--edits", inserted, "--source", work["labels"], "-o", out],
                     capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(_array(out), _array(inserted))


def test_tumour_replay_of_an_edited_history_is_refused(work, chained, capsys, tmp_path):
    """The sidecar's hash covers the voxels, not the history: a record edited by hand no longer reproduces them."""
    import shutil

    edited = tmp_path / "moved_rotated.nii.gz"
    shutil.copy(chained[1], edited)
    sidecar = _sidecar(chained[1])
    sidecar["history"][1]["params"]["offset_ras_mm"] = [-5.0, 0.0, 0.0]
    del sidecar["history"][1]["params"]["applied_offset_ras_mm"]
    edited.with_name("moved_rotated.json").write_text(json.dumps(sidecar))
    out = tmp_path / "out.nii.gz"
    rc, _, err = run(["tumour", "replay", work["labels"], "--edits", edited, "--check", "-o", out], capsys)
    assert rc == 2 and str(edited) in err and "does not reproduce" in err and len(err.splitlines()) == 1
    assert not out.exists() and not out.with_name("out.json").exists()
    rc, stdout, _ = run(["tumour", "replay", work["labels"], "--edits", edited, "-o", out], capsys)  # without --check
    assert rc == 0 and "differs from it" in stdout


def test_tumour_replay_onto_another_map_applies_the_same_edits(work, chained, capsys):
    """Another base (here the map with a new tumour drawn in): the edits are applied to it, and the CLI says the
    result differs from the edited map (--check refuses it)."""
    base = work["root"] / "replay_other" / "base.nii.gz"
    centre = _brain_centre_ras(work["labels"])
    assert run(["tumor", "new", work["labels"], "--centre", *centre, "--radius", "5", "--seed", "2", "-o", base],
               capsys)[0] == 0
    out = work["root"] / "replay_other" / "out.nii.gz"
    rc, _, err = run(["tumour", "replay", base, "--edits", chained[1], "--check", "-o", out], capsys)
    assert rc == 2 and "does not reproduce" in err and not out.exists()
    rc, stdout, err = run(["tumour", "replay", base, "--edits", chained[1], "-o", out], capsys)
    assert rc == 0 and err == "" and "2 edits replayed" in stdout and "differs from it" in stdout
    expected = replay(read_label_map(base), _sidecar(chained[1])["history"][1:])
    np.testing.assert_array_equal(_array(out), expected.array)


def test_tumour_replay_refuses_a_record_that_is_not_an_edit(work, chained, capsys, tmp_path):
    import shutil

    edited = tmp_path / "painted.nii.gz"
    shutil.copy(chained[1], edited)
    sidecar = _sidecar(chained[1])
    sidecar["history"].insert(2, {"name": "manual_segment_edit", "params": {"changed_voxels": 3},
                                  "schema_version": 1})
    edited.with_name("painted.json").write_text(json.dumps(sidecar))
    rc, _, err = run(["tumour", "replay", work["labels"], "--edits", edited, "-o", tmp_path / "o.nii.gz"], capsys)
    assert rc == 2 and "manual_segment_edit" in err and "cannot be replayed" in err


# --- demo --------------------------------------------------------------------------------------

DEMO_FILES = ["flair.nii.gz", "labels.json", "labels.nii.gz", "montage.png", "provenance.json",
              "t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "-o", str(folder)]) == 0
    return folder


def test_demo_files(demo):
    """The demo folder is a complete synthetic case from the shipped model, on the template grid."""
    from MedSynthLib.synthesis.models import resolve_model

    assert sorted(os.listdir(demo)) == DEMO_FILES
    assert sorted(os.listdir(demo.parent)) == ["demo"], "stray temporary folders"
    labels = _array(demo / "labels.nii.gz")
    assert set(np.unique(labels)) == set(range(7))
    grid = Grid.from_image(sitk.ReadImage(str(demo / "labels.nii.gz")))
    assert grid.size == (197, 233, 189)
    for modality in ("t1", "t1ce", "t2", "flair"):
        image = sitk.ReadImage(str(demo / f"{modality}.nii.gz"))
        assert Grid.from_image(image) == grid
        array = sitk.GetArrayFromImage(image)
        assert np.all(array[labels == 0] == 0), f"{modality}: background must be 0"
        assert np.isfinite(array).all() and array[labels > 0].std() > 0
    provenance = json.loads((demo / "provenance.json").read_text())
    assert provenance["labels_sha256"] == array_sha256(labels)
    assert [r["name"] for r in provenance["edits"]] == ["template_labels", "parametric_tumour"]
    assert provenance["model"]["sha256"] == resolve_model(None).sha256
    assert json.loads((demo / "labels.json").read_text())["history"] == provenance["edits"]


def test_demo_contrasts_are_mri_like(demo):
    """The shipped model reproduces the basic contrasts: WM > GM > CSF on T1, the reverse on T2,
    and enhancing tumour brighter on T1ce than on T1 (relative to white matter)."""
    labels = _array(demo / "labels.nii.gz")
    means = {m: {v: float(_array(demo / f"{m}.nii.gz")[labels == v].mean()) for v in range(1, 7)}
             for m in ("t1", "t1ce", "t2", "flair")}
    assert means["t1"][3] > means["t1"][2] > means["t1"][1]
    assert means["t2"][1] > means["t2"][2] > means["t2"][3]
    assert means["t1ce"][6] / means["t1ce"][3] > means["t1"][6] / means["t1"][3]
    assert means["flair"][5] > means["flair"][3], "oedema is bright on FLAIR"


def test_demo_montage_png(demo):
    """montage.png is a valid PNG of non-trivial size."""
    data = (demo / "montage.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 300 and height >= 300
    assert len(data) > 20_000
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"


def test_demo_refuses_existing(demo, capsys):
    """A second demo run without --overwrite fails with exit 2 and leaves the first intact."""
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in demo.iterdir()}
    rc, out, err = run(["demo", "-o", demo], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("medsynth: error:") and len(err.splitlines()) == 1
    assert str(demo) in err and "already exists" in err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in demo.iterdir()} == before
    assert sorted(os.listdir(demo.parent)) == ["demo"]


def test_tumour_shorthand_only_as_the_command_word(tmp_path, monkeypatch, capsys):
    """``tumour``/``tumor`` elsewhere in argv (a case folder named tumor) is left alone."""
    from MedSynthLib.cli import _normalise_argv

    assert _normalise_argv(["tumor", "a.nii.gz", "--translate", "1", "0", "0"])[:2] == ["tumor", "transform"]
    assert _normalise_argv(["tumour", "insert", "--from", "a"])[:2] == ["tumour", "insert"]
    assert _normalise_argv(["info", "tumor"]) == ["info", "tumor"]
    assert _normalise_argv(["info", "tumour", "--json"]) == ["info", "tumour", "--json"]
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["info", "tumor"], capsys)
    assert rc == 2 and "tumor" in err and "transform" not in err


def test_translate_rounded_to_voxels_is_reported_and_a_null_move_refused(tmp_path, capsys):
    path = work_labels_thick(tmp_path)
    rc, out, err = run(["tumour", path, "--translate", "0", "0", "2", "-o", tmp_path / "none.nii.gz"], capsys)
    assert rc == 2 and "moves no voxel" in err and "5" in err and str(path) in err
    assert not (tmp_path / "none.nii.gz").exists()
    rc, out, err = run(["tumour", path, "--translate", "0", "0", "7", "-o", tmp_path / "moved.nii.gz"], capsys)
    assert rc == 0 and "5 mm" in err and "7" in err  # the notice names applied and requested offsets
    record = _sidecar(tmp_path / "moved.nii.gz")["history"][-1]["params"]
    assert record["applied_offset_ras_mm"] == pytest.approx([0.0, 0.0, 5.0])
    rc, out, err = run(["tumour", path, "--translate", "1", "0", "0", "-o", tmp_path / "exact.nii.gz"], capsys)
    assert rc == 0 and err == ""  # a whole-voxel request: no notice


def work_labels_thick(tmp_path: Path) -> Path:
    """A small label map on a 1 x 1 x 5 mm grid (brain, WM core, a tumour)."""
    array = np.zeros((12, 40, 40), np.uint8)
    array[1:11, 4:36, 4:36] = 2
    array[2:10, 8:32, 8:32] = 3
    array[4:8, 14:24, 14:24] = 5
    array[5:7, 16:22, 16:22] = 4
    return write_volume(array, tmp_path / "thick.nii.gz", spacing=(1.0, 1.0, 5.0))


# --- a MedSynth output is not a patient's case --------------------------------------------------


@pytest.mark.parametrize("command", [["labels"], ["evaluate"], ["evaluate", "REAL", "--reference"]])
def test_a_medsynth_output_is_refused_where_a_patient_case_is_read(demo, work, tmp_path, capsys, command):
    """``labels`` and ``evaluate`` read a case as a patient's scans.  A synthesize/demo output read that way
    lost its tumour (no BraTS segmentation file: the map came out tumour-free, the score had no tumour): it is
    refused in one line that names the folder and says where its label map is, and nothing is written."""
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in demo.iterdir()}
    output = tmp_path / ("labels.nii.gz" if command == ["labels"] else "report.json")
    argv = [work["case"] if part == "REAL" else part for part in command]
    rc, out, err = run([*argv, demo, "-o", output], capsys)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("medsynth: error:")
    assert str(demo) in err and "MedSynth output" in err and "labels.nii.gz" in err
    assert list(tmp_path.iterdir()) == []
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in demo.iterdir()} == before


def test_info_describes_a_medsynth_output_with_the_tumour_of_its_label_map(demo, capsys):
    """``info`` on a synthesize/demo output says what it is (wholly synthetic images) and counts the tumour of
    its own label map, instead of reading it as a patient's case without a segmentation."""
    rc, out, err = run(["info", demo, "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    labels = _array(demo / "labels.nii.gz")
    assert info["medsynth_output"]["images"] == "synthetic"
    assert info["medsynth_output"]["label_map"] == "labels.nii.gz"
    assert info["tumour_voxels"] == {"NCR": int((labels == 4).sum()), "ED": int((labels == 5).sum()),
                                     "ET": int((labels == 6).sum())}
    assert info["brain_voxels"] == int((labels > 0).sum())
    rc, out, err = run(["info", demo], capsys)
    assert rc == 0 and "MedSynth output" in out and "no segmentation" not in out


def test_a_t1_only_case_that_cannot_be_read_gets_one_line_not_the_fallback_notice_first(tmp_path, capsys):
    """With T1 only, ``labels`` tells that it falls back to T1-only anatomy; for a T1 it then refuses (one value in
    the whole brain: no contrast) the user got that notice and the error, two lines.  Bad input gets one."""
    t1 = tmp_path / "flat_t1.nii.gz"
    flat = np.where(IMAGES["t1"] > 0, 500.0, 0.0).astype(np.float32)
    write_volume(flat, t1)
    output = tmp_path / "out" / "labels.nii.gz"
    rc, out, err = run(["labels", "--t1", t1, "-o", output], capsys)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("medsynth: error:") and str(t1) in err, err
    assert not output.parent.exists() or list(output.parent.iterdir()) == []


def test_a_translation_says_how_many_tumour_voxels_it_clipped_at_the_brains_edge(work, tmp_path, capsys):
    """A translation keeps every class's count, except tumour voxels it pushes out of the brain: those are
    clipped (up to 2 % of the core; more is refused).  That used to happen without a word."""
    before = label_counts(read_label_map(work["labels"]).array)
    reports = {}
    for offset in ("3", "6"):  # on this phantom 3 mm keeps the tumour inside the brain, 6 mm pushes oedema out
        output = tmp_path / f"moved_{offset}.nii.gz"
        rc, _, err = run(["tumour", work["labels"], "--translate", offset, "0", "0", "-o", output], capsys)
        assert rc == 0, err
        after = label_counts(read_label_map(output).array)
        lost = {name: before[name] - after[name] for name in ("NCR", "ED", "ET")}
        reports[offset] = (lost, [line for line in err.splitlines() if "clipped" in line])
    assert not any(reports["3"][0].values()) and reports["3"][1] == []
    lost, lines = reports["6"]
    assert sum(lost.values()) > 0, "the phantom no longer reaches the brain's edge at 6 mm: pick another offset"
    assert len(lines) == 1 and f"{sum(lost.values())} tumour voxels" in lines[0]
    assert all(f"{name} {count}" in lines[0] for name, count in lost.items() if count)
    # The edit's record says it too (the map's sidecar), so a replay, an export and Slicer know it.
    history = read_label_map(tmp_path / "moved_6.nii.gz").history
    assert history[-1]["params"]["clipped_tumour_voxels"] == {name: n for name, n in lost.items() if n}


def test_tumour_without_a_map_or_subcommand_names_what_to_give(capsys):
    """``medsynth tumour`` alone named argparse's internal destination (``tumour_command``); it now names what a
    user types: a label map (the transform) or one of the subcommands."""
    rc, out, err = run(["tumour"], capsys)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert "tumour_command" not in err and "LABELS" in err and "insert" in err and "replay" in err, err


def test_prepare_refuses_to_write_inside_a_patients_case_folder(work, capsys):
    """``prepare -o`` inside one of the case folders it reads wrote the prepared set (patient-derived volumes, about
    100 MB a case) into that patient's folder; it is refused in one line, nothing written there."""
    before = sorted(p.name for p in work["case"].iterdir())
    output = work["case"] / "prepared"
    rc, out, err = run(["prepare", "--data", work["root"], "-o", output], capsys)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert str(output) in err and "case folder" in err
    assert sorted(p.name for p in work["case"].iterdir()) == before


@pytest.mark.parametrize("folds", ["0", "1"])
def test_study_folds_below_two_get_one_consistent_refusal(folds, tmp_path, capsys):
    """``--folds 0`` said "must be at least 1", then ``--folds 1`` was refused with "at least 2 folds"."""
    rc, _, err = run(["study", "--data", tmp_path, "-o", tmp_path / "report", "--folds", folds], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "must be at least 2" in err, err
    assert not (tmp_path / "report").exists()
