"""`medsynth tumour template` says how a template case replays from the map it writes: as a command that runs."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from conftest import write_random_model


@pytest.mark.parametrize("output", ["template_labels.nii.gz", "maps/the template.nii.gz"])
def test_the_replay_hint_runs_as_printed(tmp_path: Path, monkeypatch, capsys, output: str) -> None:
    """The hint read 'tumour replay template_labels.nii.gz --edits CASE': no `medsynth`, no required -o, and the
    map named without its folder. Printed with CASE standing for a template case folder (here one `medsynth demo`
    made), it runs as it is and replays the case's tumour identically."""
    from MedSynthLib.cli import main
    from MedSynthLib.synthesis.networks import MODALITY_ORDER

    monkeypatch.chdir(tmp_path)
    model = write_random_model(tmp_path / "tiny", {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=1)
    assert main(["demo", "-o", "demo_case", "--model", str(model), "--device", "cpu"]) == 0
    (tmp_path / "maps").mkdir()
    capsys.readouterr()
    assert main(["tumour", "template", "-o", output]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.count("medsynth tumour replay") == 1, printed
    hint = shlex.split(printed[printed.index("medsynth tumour replay"):])
    assert hint[0] == "medsynth" and "CASE/labels.nii.gz" in hint, hint
    argv = [word.replace("CASE", "demo_case") for word in hint[1:]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "identical to it voxel for voxel" in out, out
    written = tmp_path / argv[argv.index("-o") + 1]
    assert written.exists()
