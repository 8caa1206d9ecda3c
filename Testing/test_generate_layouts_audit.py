"""``medsynth generate`` datasets as their users take them: the MSD folder nnU-Net converts, the label table, privacy
and grids travelling inside the folder that is copied, and the card's command and folder lines.

Small phantom brains and a random-weight tiny generator (as Testing/test_generate.py) keep each run to seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import phantom, write_random_model, write_volume
from MedSynthLib.cli import main
from MedSynthLib.synthesis.networks import MODALITY_ORDER

PHANTOM_CONFIG = {"kinds": {"transform": 1, "parametric": 1},
                  "transform": {"translate_mm": 3, "rotate_deg": 15, "scale_range": [0.9, 1.1]},
                  "parametric": {"radius_fraction": [0.15, 0.25], "p_template": 1.0}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two phantom case folders, a tiny model and a sampler config."""
    root = tmp_path_factory.mktemp("layouts_audit_data")
    for k in range(2):
        images, seg = phantom(seed=k)
        folder = root / "cases" / f"P{k}"
        for modality, array in images.items():
            write_volume(array, folder / f"P{k}_{modality}.nii.gz")
        write_volume(np.roll(seg, k, axis=1), folder / f"P{k}_seg.nii.gz")
    model = write_random_model(root / "tiny", {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=2018)
    config = root / "sampler.json"
    config.write_text(json.dumps(PHANTOM_CONFIG))
    return {"cases": root / "cases", "model": model, "config": config, "cache": root / "cache"}


def _argv(data: dict[str, Path], out: Path, layout: str, n: int, *extra: str) -> list[str]:
    return ["generate", "-n", str(n), "--labels-from", str(data["cases"]), "--edits", str(data["config"]),
            "--model", str(data["model"]), "--layout", layout, "-o", str(out), "--device", "cpu",
            "--precision", "fp32", "--seed", "3", "--cache", str(data["cache"]), "--quiet", *extra]


@pytest.fixture(scope="module")
def nnunet_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit_nnunet") / "out"
    assert main(_argv(data, out, "nnunet", 2)) == 0
    return out


@pytest.fixture(scope="module")
def msd_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit_msd") / "out"
    assert main(_argv(data, out, "msd", 2)) == 0
    return out


@pytest.fixture(scope="module")
def mixed_brats_run(data, tmp_path_factory) -> Path:
    """BraTS 2021 layout over the phantoms and the template: cases on two grids."""
    out = tmp_path_factory.mktemp("audit_brats") / "out"
    assert main(_argv(data, out, "brats2021", 4, "--template")) == 0
    return out


# --- 1. the MSD folder is one nnU-Net converts ----------------------------------------------------


def test_msd_task_folder_has_an_empty_imagests_and_no_test_cases(msd_run):
    folder = msd_run / "Task501_BrainTumourSynth"
    assert (folder / "imagesTs").is_dir() and not any((folder / "imagesTs").iterdir())
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["test"] == [] and meta["numTest"] == 0 and meta["numTraining"] == 2


def test_nnunets_msd_converter_takes_the_task_folder(msd_run, tmp_path):
    pytest.importorskip("nnunetv2")
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), OMP_NUM_THREADS="1")
    code = ("from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset; "
            f"convert_msd_dataset({str(msd_run / 'Task501_BrainTumourSynth')!r}, 503, 1)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    converted = tmp_path / "raw" / "Dataset503_BrainTumourSynth"
    assert len(list((converted / "imagesTr").glob("*.nii.gz"))) == 8
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(converted), 1)


# --- 2. which integer is which tumour class -------------------------------------------------------


def test_nnunet_dataset_json_says_which_value_is_which_class_and_passes_the_integrity_check(nnunet_run):
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = nnunet_run / "Dataset501_BrainTumourSynth"
    meta = json.loads((folder / "dataset.json").read_text())
    table = meta["label_values"]
    assert table["values"] == {"0": "background", "1": "ED", "2": "NCR", "3": "ET"}
    assert table["to_brats2021"] == {"0": 0, "1": 2, "2": 1, "3": 4}
    assert table["to_brats2023"] == {"0": 0, "1": 2, "2": 1, "3": 3}
    verify_dataset_integrity(str(folder), 1)


def test_msd_dataset_json_carries_the_same_table(msd_run):
    meta = json.loads((msd_run / "Task501_BrainTumourSynth" / "dataset.json").read_text())
    assert meta["label_values"]["values"]["1"] == "ED" and meta["label_values"]["to_brats2021"]["3"] == 4


def test_the_card_gives_the_label_table(nnunet_run, mixed_brats_run):
    card = json.loads((nnunet_run / "dataset_card.json").read_text())
    assert card["label_values"]["values"]["2"] == "NCR"
    readme = (nnunet_run / "README.md").read_text()
    assert "## Label values" in readme
    assert "| 1 | ED" in readme and "| 3 | ET" in readme
    # A BraTS layout's own values: 4 is ET in BraTS 2021.
    brats = json.loads((mixed_brats_run / "dataset_card.json").read_text())
    assert brats["label_values"]["values"] == {"0": "background", "1": "NCR", "2": "ED", "4": "ET"}
    assert "| 4 | ET" in (mixed_brats_run / "README.md").read_text()


# --- 3. the notice travels with the folder that is copied ----------------------------------------


@pytest.mark.parametrize("run, folder", [("nnunet_run", "Dataset501_BrainTumourSynth"),
                                         ("msd_run", "Task501_BrainTumourSynth")])
def test_the_dataset_folder_holds_its_own_readme(run, folder, request):
    out = request.getfixturevalue(run)
    readme = (out / folder / "README.md").read_text()
    records = [json.loads(p.read_text()) for p in (out / "provenance").glob("*.json")]
    anonymous = sum(r["privacy"]["anonymous"] for r in records)
    assert anonymous < len(records)  # phantoms' own brains: not anonymous
    assert readme.splitlines()[2].startswith("**Synthetic images, NOT anonymous**")
    assert f"{len(records) - anonymous} of {len(records)} cases" in readme
    assert "| 1 | ED" in readme and "BraTS 2021" in readme
    assert "dataset_card.json" in readme and "provenance/" in readme


# --- 4. grids and orientations --------------------------------------------------------------------


def test_the_card_counts_the_cases_on_each_grid_and_warns_on_a_mix(mixed_brats_run):
    card = json.loads((mixed_brats_run / "dataset_card.json").read_text())
    records = [json.loads(p.read_text()) for p in (mixed_brats_run / "provenance").glob("*.json")]
    expected = Counter(tuple(r["grid"]["size"]) for r in records)
    assert len(expected) == 2, "the seed should mix the template and the phantoms"
    assert {tuple(g["size"]): g["cases"] for g in card["grids"]} == dict(expected)
    template = next(g for g in card["grids"] if g["size"] == [197, 233, 189])
    assert template["orientation"] == "RAS" and "MNI" in template["space"]
    phantoms = next(g for g in card["grids"] if g["size"] == [44, 48, 40])
    assert phantoms["orientation"] == "LPS"
    warnings = " ".join(card["grid_warnings"])
    assert "2 grids" in warnings and "240 x 240 x 155" in warnings
    readme = (mixed_brats_run / "README.md").read_text()
    assert "## Image grids" in readme and "197 x 233 x 189" in readme and "RAS" in readme
    assert readme.count("**Warning**") == len(card["grid_warnings"]) == 2


def test_a_dataset_on_one_grid_has_no_grid_warning(nnunet_run):
    card = json.loads((nnunet_run / "dataset_card.json").read_text())
    assert [(g["size"], g["orientation"], g["cases"]) for g in card["grids"]] == [([44, 48, 40], "LPS", 2)]
    assert card["grid_warnings"] == []
    assert "**Warning**" not in (nnunet_run / "README.md").read_text()


def test_a_brats_grid_is_named_and_the_template_grid_is_not_it():
    from MedSynthLib.generate.card import describe_grid

    brats = {"size": [240, 240, 155], "spacing": [1.0, 1.0, 1.0], "origin": [0.0, -239.0, 0.0],
             "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    described = describe_grid(brats, base="case0")
    assert described["orientation"] == "LPS" and described["brats_grid"] and "SRI24" in described["space"]
    icbm = {"size": [197, 233, 189], "spacing": [1.0, 1.0, 1.0], "origin": [98.0, 134.0, -72.0],
            "direction": [-1, 0, 0, 0, -1, 0, 0, 0, 1]}
    described = describe_grid(icbm, base="template")
    assert described["orientation"] == "RAS" and not described["brats_grid"] and "MNI" in described["space"]


# --- 5. the command and the folder lines ----------------------------------------------------------


def test_the_card_command_is_what_was_typed_with_paths_hidden():
    from MedSynthLib.generate.card import card_command

    argv = ["generate", "-n", "2", "--template", "--anonymous", "--layout", "brats2021", "-o", "/home/doe/out"]
    assert card_command(argv) == "medsynth generate -n 2 --template --anonymous --layout brats2021 -o OUT"
    argv = ["generate", "-n", "5", "--labels-from", "/data/Doe_John", "/data/segs", "--edits=/x/cfg.json",
            "--model", "/models/mine", "--layout", "nnunet", "--dataset-id", "502", "--output=/o", "--cache", "/c",
            "--quiet", "--command-line", "secret"]
    assert card_command(argv) == ("medsynth generate -n 5 --labels-from DIR DIR --edits=CONFIG --model MODEL_DIR "
                                  "--layout nnunet --dataset-id 502 --output=OUT --cache DIR --quiet")
    # A registered model's name is kept; an abbreviated path option is still hidden.
    assert card_command(["generate", "--model", "medsynth-spade", "--labels", "/p/x", "-n", "1"]) == (
        "medsynth generate --model medsynth-spade --labels DIR -n 1")


def test_the_brats_card_names_its_case_folders_not_a_dot(mixed_brats_run):
    readme = (mixed_brats_run / "README.md").read_text()
    layout_line = next(line for line in readme.splitlines() if line.startswith("- Layout:"))
    assert "folder `.`" not in layout_line and "BrainTumourSynth_00000/" in layout_line
    card = json.loads((mixed_brats_run / "dataset_card.json").read_text())
    assert card["dataset_folder"] is None and card["case_folders"] == "BrainTumourSynth_NNNNN/"
