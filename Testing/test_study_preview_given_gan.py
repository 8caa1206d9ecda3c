"""The preview of a study run with a given GAN (``gan_model``): it looked for the GAN among the study's trained
ones (``WORK/gan``) only, found none, and refused every fold ("no fold has its GAN ... yet") although the study
had finished."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_random_model
from MedSynthLib.cli import main
from MedSynthLib.study.config import load_config
from MedSynthLib.study.preview import main as preview_main
from MedSynthLib.synthesis.networks import MODALITY_ORDER
from test_study import study_args, write_cases


def test_the_preview_of_a_study_with_a_given_gan_reports_it(tmp_path: Path, capsys) -> None:
    data = write_cases(tmp_path / "cases")
    model = write_random_model(tmp_path / "gan", {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=7)
    config = tmp_path / "given.json"
    config.write_text(json.dumps(load_config("micro").to_json() | {"gan_model": str(model)}))
    work = tmp_path / "work"
    argv = study_args(data, tmp_path / "report", "--work", str(work))
    argv[argv.index("micro")] = str(config)
    assert main(argv) == 0
    finished = json.loads((tmp_path / "report" / "report.json").read_text())
    assert not (work / "gan").exists()  # nothing trained: the GAN was given

    capsys.readouterr()
    rc = preview_main(["--data", str(data), "--work", str(work), "-o", str(tmp_path / "preview"),
                       "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 0, err
    report = json.loads((tmp_path / "preview" / "report.json").read_text())
    assert report["partial"] is None
    assert [g["source"] for g in report["gan"]] == ["given"] * len(finished["gan"])
    assert report["gan"] == finished["gan"]
    for key in ("segmentation", "fidelity", "memorisation"):
        assert report[key] == finished[key], key
