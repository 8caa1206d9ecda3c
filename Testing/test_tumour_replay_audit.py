"""``medsynth tumour replay`` and the transform edits, as an audit found them.

* A random draw's record was never checked against the edits after it: a sidecar whose ``random_tumour`` seed
  was changed still replayed as "identical ... drawn by random_tumour seed 999".
* A refused replay gave one generic reason whatever the cause (another anatomy model, another patient's map,
  another MedSynth version), and a sidecar of another version replayed without a word.
* No command wrote the tumour-free template map, so a template case could not be replayed from the command line.
* ``--rotate 0 0 0``, ``--rotate 0 0 360`` and ``--scale 1`` were recorded although they change no voxel, while
  ``--translate 0 0 0`` was refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from MedSynthLib.cli import main
from MedSynthLib.edits import RandomTumourEdit, replay
from MedSynthLib.schema.errors import EditError
from MedSynthLib.schema.labelmap import read_label_map, write_label_map
from MedSynthLib.schema.labels import SCHEMA_VERSION, Label
from MedSynthLib.schema.provenance import software_versions
from test_edits import GRIDS, make_grid, synthetic_brain


def _derive_record(model: str = "atlas-em", **settings) -> dict:
    return {"name": "derive_labels",
            "params": {"convention": "brats2021", "anatomy_model": {"name": model, **settings}},
            "schema_version": SCHEMA_VERSION}


def _write(path: Path, labelmap, record: dict) -> Path:
    labelmap.history.append(record)
    write_label_map(labelmap, path)
    return path


def _labels(tmp_path: Path, name: str = "labels.nii.gz", record: dict | None = None, **brain) -> Path:
    return _write(tmp_path / name, synthetic_brain(make_grid(*GRIDS["iso"]), **brain), record or _derive_record())


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name.replace(".nii.gz", ".json"))


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _edited_copy(tmp_path: Path, edited: Path, change) -> Path:
    """A copy of ``edited`` whose sidecar ``change(sidecar)`` altered (the voxels' hash still matches)."""
    copy = tmp_path / "changed.nii.gz"
    shutil.copy(edited, copy)
    sidecar = json.loads(_sidecar(edited).read_text())
    change(sidecar)
    _sidecar(copy).write_text(json.dumps(sidecar))
    return copy


def _random_edited(tmp_path: Path, capsys, labels: Path, seed: str = "11", *options: str) -> Path:
    out = tmp_path / f"random{seed}.nii.gz"
    rc, _, err = _run(capsys, "tumour", "random", labels, "--seed", seed, *options, "-o", out)
    assert rc == 0, err
    return out


def _refused(capsys, argv, out: Path) -> str:
    rc, stdout, err = _run(capsys, *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (rc, stdout, err)
    assert not out.exists() and not _sidecar(out).exists()
    return err


# --- 1: a draw's seed and options are checked against the edits it drew ----------------------------


@pytest.mark.parametrize("change", [{"seed": 999}, {"p_parametric": 1.0}, {"translate_mm": 3.0}])
def test_replay_refuses_a_draw_record_whose_seed_or_options_do_not_draw_its_edits(tmp_path, capsys, change):
    labels = _labels(tmp_path)
    edited = _random_edited(tmp_path, capsys, labels, "11", "--p-new", "0")
    changed = _edited_copy(tmp_path, edited, lambda s: s["history"][1]["params"].update(change))
    out = tmp_path / "again.nii.gz"
    for check in (["--check"], []):
        err = _refused(capsys, ["tumour", "replay", labels, "--edits", changed, *check, "-o", out], out)
        assert str(changed) in err and "random_tumour" in err and "does not draw" in err, err
    # The library refuses it too, naming the seed.
    history = json.loads(_sidecar(changed).read_text())["history"]
    with pytest.raises(EditError, match="random_tumour"):
        replay(read_label_map(labels), history[1:])


def test_an_unchanged_draw_still_replays_identically(tmp_path, capsys):
    labels = _labels(tmp_path)
    edited = _random_edited(tmp_path, capsys, labels, "11")
    out = tmp_path / "again.nii.gz"
    rc, stdout, err = _run(capsys, "tumour", "replay", labels, "--edits", edited, "--check", "-o", out)
    assert rc == 0 and err == "" and "identical to it voxel for voxel" in stdout and "seed 11" in stdout, (stdout, err)
    assert read_label_map(out).history == read_label_map(edited).history


def test_the_library_checks_a_draw_against_the_map_before_it():
    labelmap = synthetic_brain(make_grid(*GRIDS["aniso_lps"]))
    drawn = RandomTumourEdit(p_parametric=0.0, max_tries=4)(labelmap, 7)
    np.testing.assert_array_equal(replay(labelmap, drawn.history).array, drawn.array)
    assert replay(labelmap, drawn.history).history == drawn.history
    tampered = [dict(drawn.history[0], params=dict(drawn.history[0]["params"], seed=8)), *drawn.history[1:]]
    with pytest.raises(EditError, match="seed 8"):
        replay(labelmap, tampered)


# --- 2: a refused replay says why ---------------------------------------------------------------


def _transformed(tmp_path: Path, capsys, labels: Path) -> Path:
    out = tmp_path / "moved.nii.gz"
    rc, _, err = _run(capsys, "tumour", labels, "--rotate", "0", "0", "25", "--translate", "3", "0", "0", "-o", out)
    assert rc == 0, err
    return out


def test_a_base_of_another_anatomy_model_is_named_as_the_reason(tmp_path, capsys):
    labels = _labels(tmp_path)
    edited = _transformed(tmp_path, capsys, labels)
    # The same scans labelled by another model: other tissue voxels, another derive_labels record.
    other = synthetic_brain(make_grid(*GRIDS["iso"]))
    gm = np.argwhere(other.array == Label.GM)[:200]
    other.array[tuple(gm.T)] = Label.WM
    base = _write(tmp_path / "kmeans.nii.gz", other, _derive_record("kmeans-t1"))
    out = tmp_path / "again.nii.gz"
    err = _refused(capsys, ["tumour", "replay", base, "--edits", edited, "--check", "-o", out], out)
    assert "anatomy model" in err and "kmeans-t1" in err and "atlas-em" in err, err


def test_a_base_of_the_same_model_with_other_settings_names_the_setting(tmp_path, capsys):
    labels = _labels(tmp_path, record=_derive_record(registration_seed=1))
    edited = _transformed(tmp_path, capsys, labels)
    other = synthetic_brain(make_grid(*GRIDS["iso"]))
    gm = np.argwhere(other.array == Label.GM)[:200]
    other.array[tuple(gm.T)] = Label.WM
    base = _write(tmp_path / "seed2.nii.gz", other, _derive_record(registration_seed=2))
    out = tmp_path / "again.nii.gz"
    err = _refused(capsys, ["tumour", "replay", base, "--edits", edited, "--check", "-o", out], out)
    assert "anatomy model" in err and "registration_seed" in err, err


def test_another_patients_map_is_named_as_the_reason(tmp_path, capsys):
    labels = _labels(tmp_path)
    edited = _transformed(tmp_path, capsys, labels)
    # Same derive_labels record (nothing in it names the patient), another brain.
    base = _labels(tmp_path, "other_patient.nii.gz", brain_fraction=0.40)
    out = tmp_path / "again.nii.gz"
    err = _refused(capsys, ["tumour", "replay", base, "--edits", edited, "--check", "-o", out], out)
    assert "brain" in err and "another patient" in err, err
    # Without --check the edits are applied, and the line says why the result differs.
    rc, stdout, err = _run(capsys, "tumour", "replay", base, "--edits", edited, "-o", out)
    assert rc == 0 and "differs from it" in stdout and "another patient" in stdout, (stdout, err)


def test_a_sidecar_of_another_medsynth_that_replays_identically_gets_a_notice(tmp_path, capsys):
    labels = _labels(tmp_path)
    edited = _transformed(tmp_path, capsys, labels)
    older = _edited_copy(tmp_path, edited, lambda s: s["software"].update(medsynth="0.0.1"))
    out = tmp_path / "again.nii.gz"
    rc, stdout, err = _run(capsys, "tumour", "replay", labels, "--edits", older, "--check", "-o", out)
    assert rc == 0 and "identical to it voxel for voxel" in stdout, (stdout, err)
    this = software_versions()["medsynth"]
    assert len(err.strip().splitlines()) == 1 and "0.0.1" in err and this in err, err


def test_a_sidecar_of_another_medsynth_that_does_not_reproduce_names_the_version(tmp_path, capsys):
    labels = _labels(tmp_path)
    edited = _transformed(tmp_path, capsys, labels)

    def older_and_otherwise(sidecar):
        sidecar["software"]["medsynth"] = "0.0.1"
        sidecar["history"][1]["params"]["angles_deg"] = [0.0, 0.0, 40.0]

    changed = _edited_copy(tmp_path, edited, older_and_otherwise)
    out = tmp_path / "again.nii.gz"
    err = _refused(capsys, ["tumour", "replay", labels, "--edits", changed, "--check", "-o", out], out)
    assert "MedSynth 0.0.1" in err and software_versions()["medsynth"] in err, err


def test_a_record_edited_by_hand_on_the_right_base_says_so(tmp_path, capsys):
    labels = _labels(tmp_path)
    edited = _transformed(tmp_path, capsys, labels)
    changed = _edited_copy(tmp_path, edited,
                           lambda s: s["history"][1]["params"].update(angles_deg=[0.0, 0.0, 40.0]))
    out = tmp_path / "again.nii.gz"
    err = _refused(capsys, ["tumour", "replay", labels, "--edits", changed, "--check", "-o", out], out)
    assert "edited by hand" in err and "anatomy model" not in err and "another patient" not in err, err


# --- 3: the template's own map, for a template case's replay ------------------------------------------


def test_tumour_template_writes_the_template_map_and_a_template_case_replays_from_it(tmp_path, capsys):
    from MedSynthLib.cases.template import template_label_map

    template = tmp_path / "template.nii.gz"
    rc, stdout, err = _run(capsys, "tumour", "template", "-o", template)
    assert rc == 0 and err == "" and str(template) in stdout, (stdout, err)
    written, library = read_label_map(template), template_label_map()
    assert written.history == library.history and written.history[0]["name"] == "template_labels"
    np.testing.assert_array_equal(written.array, library.array)
    assert not (written.array >= Label.NCR).any()
    # A case the library made on the template replays from the written map.
    case = tmp_path / "case.nii.gz"
    write_label_map(RandomTumourEdit()(library, 4), case)
    again = tmp_path / "again.nii.gz"
    rc, stdout, err = _run(capsys, "tumour", "replay", template, "--edits", case, "--check", "-o", again)
    assert rc == 0 and "identical to it voxel for voxel" in stdout, (stdout, err)
    # An existing output is kept without --overwrite.
    before = template.read_bytes()
    err = _run(capsys, "tumour", "template", "-o", template)[2]
    assert "--overwrite" in err and template.read_bytes() == before


# --- 4: an edit that changes nothing is refused ------------------------------------------------------


@pytest.mark.parametrize("option", [["--rotate", "0", "0", "0"], ["--rotate", "0", "0", "360"],
                                    ["--rotate", "720", "0", "-360"], ["--scale", "1"], ["--scale", "1", "1", "1"],
                                    ["--rotate", "0", "0", "0", "--translate", "4", "0", "0"]])
def test_an_edit_that_changes_nothing_is_refused(tmp_path, capsys, option):
    labels = _labels(tmp_path)
    out = tmp_path / "out.nii.gz"
    err = _refused(capsys, ["tumour", labels, *option, "-o", out], out)
    assert option[0] in err and str(labels) in err and "changes no voxel" in err, err


@pytest.mark.parametrize("option", [["--rotate", "720", "30", "-360"], ["--scale", "1.3"]])
def test_an_edit_that_changes_voxels_is_still_applied(tmp_path, capsys, option):
    labels = _labels(tmp_path)
    out = tmp_path / "out.nii.gz"
    rc, _, err = _run(capsys, "tumour", labels, *option, "-o", out)
    assert rc == 0 and err == "", err
