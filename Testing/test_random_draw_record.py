"""A random tumour edit records its own draw: the sampler's seed and options, typed, before the edits it drew.

``medsynth tumour random --seed S --p-new P`` (and the Slicer module's random tumour) wrote the edits it drew,
which replay, but not S or P: the draw could be neither made again nor read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from MedSynthLib.cli import main
from MedSynthLib.edits import RandomTumourEdit, replay
from MedSynthLib.schema.labelmap import read_label_map, write_label_map
from MedSynthLib.schema.labels import SCHEMA_VERSION
from MedSynthLib.schema.provenance import PrivacyRecord, parse_step
from test_edits import GRIDS, make_grid, synthetic_brain

TEMPLATE = {"name": "template_labels", "params": {"template": "ICBM152-2009a-sym"}, "schema_version": SCHEMA_VERSION}


def _sampler_options(sampler: RandomTumourEdit) -> dict:
    """The sampler's options as JSON writes them (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(sampler)))


def _labels(tmp_path: Path, tumour: bool = True) -> Path:
    labelmap = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=(0.62, 0.5, 0.5) if tumour else None)
    labelmap.history.append(dict(TEMPLATE))
    path = tmp_path / "labels.nii.gz"
    write_label_map(labelmap, path)
    return path


def _random(capsys, labels: Path, out: Path, *options: str) -> list[dict]:
    capsys.readouterr()
    rc = main(["tumour", "random", str(labels), *options, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    return json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())["history"]


def test_tumour_random_records_its_seed_and_options_before_the_edits_it_drew(tmp_path, capsys):
    labels = _labels(tmp_path)
    history = _random(capsys, labels, tmp_path / "out.nii.gz", "--seed", "11", "--p-new", "0.6")
    assert history[0] == TEMPLATE
    draw = history[1]
    assert draw["name"] == "random_tumour", [r["name"] for r in history]
    drawn = history[2:]
    assert drawn and all(r["name"] != "random_tumour" for r in drawn)
    expected = dict(_sampler_options(RandomTumourEdit(p_parametric=0.6)), seed=11, drawn_edits=len(drawn))
    assert draw["params"] == expected
    assert draw["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("seed, p_new", [("3", "0"), ("11", "0.6"), ("5", "1")])
def test_the_recorded_draw_makes_the_same_map_again(tmp_path, capsys, seed, p_new):
    """The seed and options in the record are all a user needs to draw the same edit again."""
    labels = _labels(tmp_path)
    out = tmp_path / "out.nii.gz"
    history = _random(capsys, labels, out, "--seed", seed, "--p-new", p_new)
    params = dict(history[1]["params"])
    recorded_seed = params.pop("seed")
    params.pop("drawn_edits")
    sampler = RandomTumourEdit(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    again = sampler(read_label_map(labels), recorded_seed)
    np.testing.assert_array_equal(again.array, read_label_map(out).array)
    assert again.history == history


def test_the_draw_record_is_typed_and_replays(tmp_path, capsys):
    """The record is a known, typed step (an export keeps it whole, the privacy inferred from the history
    still knows the tumour was drawn), and ``tumour replay --check`` reproduces the map and its history."""
    labels = _labels(tmp_path, tumour=False)  # no tumour: the draw is a parametric one
    out = tmp_path / "out.nii.gz"
    history = _random(capsys, labels, out, "--seed", "4")
    assert [r["name"] for r in history] == ["template_labels", "random_tumour", "parametric_tumour"]
    step = parse_step(history[1])
    assert step.recognised and step.to_json(for_export=True) == history[1]
    inferred = PrivacyRecord.from_history(history, read_label_map(out).array)
    assert inferred.tumour_origin == "parametric", inferred
    again = tmp_path / "again.nii.gz"
    capsys.readouterr()
    assert main(["tumour", "replay", str(labels), "--edits", str(out), "--check", "-o", str(again)]) == 0
    assert "identical to it voxel for voxel" in capsys.readouterr().out
    assert read_label_map(again).history == history


def test_the_library_sampler_records_its_draw_too():
    """The Slicer module and the study call the sampler directly: its result carries the same record."""
    labelmap = synthetic_brain(make_grid(*GRIDS["aniso_lps"]))
    sampler = RandomTumourEdit(translate_mm=6.0, rotate_deg=12.0, p_flip=0.0, p_parametric=0.0, max_tries=4)
    out = sampler(labelmap, 7)
    draw, *drawn = out.history
    assert draw == {"name": "random_tumour", "schema_version": SCHEMA_VERSION,
                    "params": dict(_sampler_options(sampler), seed=7, drawn_edits=len(drawn))}
    assert [e.to_record() for e in sampler.sample(labelmap, 7)] == drawn
    np.testing.assert_array_equal(replay(labelmap, out.history).array, out.array)


@pytest.mark.parametrize("change, message", [
    ({"seed": -1}, "seed must be"),
    ({"seed": "abc"}, "seed must be"),
    ({"p_parametric": 2.0}, "p_parametric must be"),
    ({"drawn_edits": 0}, "drawn_edits must be"),
])
def test_a_hand_edited_draw_record_is_refused_on_replay(tmp_path, capsys, change, message):
    labels = _labels(tmp_path)
    out = tmp_path / "out.nii.gz"
    _random(capsys, labels, out, "--seed", "2")
    sidecar = out.with_name("out.json")
    record = json.loads(sidecar.read_text())
    record["history"][1]["params"].update(change)
    sidecar.write_text(json.dumps(record))
    again = tmp_path / "again.nii.gz"
    capsys.readouterr()
    assert main(["tumour", "replay", str(labels), "--edits", str(out), "-o", str(again)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not again.exists()


def _replay_line(capsys, labels: Path, edits: Path, out: Path) -> str:
    capsys.readouterr()
    assert main(["tumour", "replay", str(labels), "--edits", str(edits), "--check", "-o", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " replayed" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_tumour_replay_reports_the_draw_as_a_draw_not_an_edit(tmp_path, capsys):
    """The draw record changes no voxel: ``tumour replay`` counted it as one more edit ("4 edits replayed
    (random_tumour, rotate, scale, translate)"); it names the draw that made the edits instead."""
    labels = _labels(tmp_path)
    out = tmp_path / "out.nii.gz"
    history = _random(capsys, labels, out, "--seed", "7", "--p-new", "0")
    drawn = [r["name"] for r in history[2:]]
    line = _replay_line(capsys, labels, out, tmp_path / "again.nii.gz")
    n = len(drawn)
    assert line.startswith(f"{n} edit{'s' if n != 1 else ''} replayed ({', '.join(drawn)}), drawn by random_tumour "
                           f"seed 7 from {out}:"), line


def test_tumour_replay_says_which_edits_a_draw_made(tmp_path, capsys):
    """An edit the user made before the draw is replayed too, but was not drawn: the line counts the drawn ones."""
    labels = _labels(tmp_path)
    moved = tmp_path / "moved.nii.gz"
    capsys.readouterr()
    assert main(["tumour", "transform", str(labels), "--translate", "2", "0", "0", "-o", str(moved)]) == 0
    out = tmp_path / "out.nii.gz"
    history = _random(capsys, moved, out, "--seed", "5", "--p-new", "0")
    assert [r["name"] for r in history[:3]] == ["template_labels", "translate", "random_tumour"]
    drawn = [r["name"] for r in history[3:]]
    line = _replay_line(capsys, labels, out, tmp_path / "again.nii.gz")
    total = len(drawn) + 1
    assert line.startswith(f"{total} edits replayed ({', '.join(['translate', *drawn])}), {len(drawn)} of them drawn "
                           f"by random_tumour seed 5 from {out}:"), line
