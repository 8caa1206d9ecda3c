"""``medsynth generate``'s run checks found by an audit: what ``--overwrite`` may replace, the device, precision and
seed checked before anything is written, the smaller-``-n`` refusal per layout, options that apply to nothing, and the
card's command as typed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from MedSynthLib.cli import main
from test_generate import _argv, _file_hashes, _records, gen_data  # noqa: F401 - gen_data: the phantom sources


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_run(gen_data, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("audit_small") / "out"
    assert main(_argv(gen_data, out, n=1)) == 0
    return out


@pytest.fixture(scope="module")
def brats_run(gen_data, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("audit_brats") / "out"
    assert main(_argv(gen_data, out, n=2, layout="brats2021")) == 0
    return out


# --- 1. --overwrite replaces only a folder that holds nothing but generate's files ---------------------------------


@pytest.mark.parametrize("foreign, named", [
    ("Dataset137_Real/dataset.json", "Dataset137_Real"),
    ("notes.txt", "notes.txt"),
    ("Dataset501_BrainTumourSynth/imagesTs/Real_001_0000.nii.gz", "Dataset501_BrainTumourSynth/imagesTs"),
    ("Dataset501_BrainTumourSynth/imagesTr/Real_001_0000.nii.gz",
     "Dataset501_BrainTumourSynth/imagesTr/Real_001_0000.nii.gz"),
    ("Dataset501_BrainTumourSynth/splits.json", "Dataset501_BrainTumourSynth/splits.json"),
])
def test_overwrite_refuses_a_folder_holding_what_generate_did_not_write(gen_data, small_run, tmp_path, capsys,
                                                                         foreign, named):  # noqa: F811
    """``-o nnUNet_raw`` (the README's own example) holds the user's other datasets: ``--overwrite`` deleted them all
    with the generated one."""
    out = Path(shutil.copytree(small_run, tmp_path / "raw"))
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("precious\n")
    before = _files(out)
    assert main(_argv(gen_data, out, "--overwrite", "--seed", "8", n=1)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert named in err, err
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # nothing set aside is left


def test_overwrite_of_a_brats_dataset_refuses_a_users_case_folder(gen_data, brats_run, tmp_path, capsys):  # noqa: F811
    out = Path(shutil.copytree(brats_run, tmp_path / "brats"))
    (out / "BraTS2021_00000").mkdir()
    (out / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").write_text("precious\n")
    before = _files(out)
    assert main(_argv(gen_data, out, "--overwrite", n=1, layout="brats2021")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "BraTS2021_00000" in err, err
    assert _files(out) == before


def test_overwrite_of_generates_own_files_still_replaces_them(gen_data, brats_run, tmp_path):  # noqa: F811
    """A BraTS dataset's case folders (complete or cut before their record), its card and records are generate's."""
    out = Path(shutil.copytree(brats_run, tmp_path / "brats"))
    cut = out / "BrainTumourSynth_00005"  # a case moved into place, cut before its record
    cut.mkdir()
    for path in (out / "BrainTumourSynth_00001").iterdir():
        shutil.copyfile(path, cut / path.name.replace("00001", "00005"))
    assert main(_argv(gen_data, out, "--overwrite", "--seed", "8", n=1, layout="brats2021")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats"]
    assert sorted(_records(out)) == ["BrainTumourSynth_00000"]
    assert not (out / "BrainTumourSynth_00001").exists() and not (out / "BrainTumourSynth_00005").exists()


def test_overwrite_passes_over_the_file_browsers_own_files(gen_data, brats_run, tmp_path):  # noqa: F811
    """A dataset opened in macOS Finder or Windows Explorer holds .DS_Store / Thumbs.db / desktop.ini / ._NAME files
    the browser wrote, not the user: ``--overwrite`` refused the folder, naming them as the user's files."""
    out = Path(shutil.copytree(brats_run, tmp_path / "brats"))
    for name in (".DS_Store", "BrainTumourSynth_00000/.DS_Store", "Thumbs.db", "BrainTumourSynth_00001/desktop.ini",
                 "._dataset_card.json"):
        (out / name).write_bytes(b"\x00\x00\x00\x01Bud1")
    assert main(_argv(gen_data, out, "--overwrite", "--seed", "8", n=1, layout="brats2021")) == 0
    assert sorted(_records(out)) == ["BrainTumourSynth_00000"]


# --- 2. device, precision and seed are checked before anything is written -------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--precision", "fp8", "--precision fp8"),
    ("--precision", "fp16", "--precision fp16"),  # with --device cpu
    ("--device", "cuda", "--device cuda"),
    ("--device", "cuda:x", "--device cuda:x"),
    ("--device", "tpu", "--device tpu"),
    ("--seed", "-1", "seed -1"),
    ("--seed", str(2 ** 32), f"seed {2 ** 32}"),
])
def test_bad_device_precision_or_seed_writes_nothing(gen_data, tmp_path, monkeypatch, capsys, option, value,
                                                     message):  # noqa: F811
    """They were checked when the workers started, after ``generate.json`` was written: the corrected command was
    then refused as a run with other settings (and ``--seed -1`` ended in a traceback)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = _argv(gen_data, out, n=1)
    argv[argv.index(option) + 1] = value
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert not out.exists()


def test_the_python_api_refuses_a_bad_seed_before_writing(gen_data, tmp_path):  # noqa: F811
    from MedSynthLib.generate.runner import GenerateOptions, generate
    from MedSynthLib.schema.errors import MedSynthError

    out = tmp_path / "out"
    with pytest.raises(MedSynthError, match="seed"):
        generate(GenerateOptions(n=1, output=out, template=True, anonymous=True, model=str(gen_data["model"]),
                                 seed=-1, device="cpu", precision="fp32", progress=False))
    assert not out.exists()


# --- 3. the smaller -n refusal says what each layout would leave out -------------------------------------------------


def test_a_smaller_n_on_a_brats_dataset_names_no_dataset_json(gen_data, brats_run, tmp_path, capsys):  # noqa: F811
    out = Path(shutil.copytree(brats_run, tmp_path / "shrink"))
    assert main(_argv(gen_data, out, n=1, layout="brats2021")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "BrainTumourSynth_00001" in err and "-n 2" in err, err
    assert "dataset.json" not in err and "card" in err, err


# --- 4. options that apply to nothing, and the card's command --------------------------------------------------------


@pytest.mark.parametrize("extra, layout, message", [
    (("--anonymous", "--template", "--label-convention", "brats2021"), "nnunet", "--label-convention"),
    (("--dataset-id", "502"), "brats2021", "--dataset-id"),
    (("--dataset-id", "502"), "brats2023", "--dataset-id"),
])
def test_an_option_that_applies_to_nothing_is_refused(gen_data, tmp_path, capsys, extra, layout,
                                                      message):  # noqa: F811
    out = tmp_path / "out"
    assert main(_argv(gen_data, out, *extra, n=1, layout=layout)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_the_card_command_is_the_command_as_typed(brats_run):
    """The card showed ``--dataset-id 501`` (and every other default) for a BraTS layout the user gave none for."""
    card = json.loads((brats_run / "dataset_card.json").read_text())
    assert card["command"] == ("medsynth generate -n 2 --labels-from DIR DIR --edits CONFIG --model MODEL_DIR "
                               "--layout brats2021 -o OUT --device cpu --precision fp32 --seed 7 --quiet"), card["command"]
    assert f"- Command: `{card['command']}`" in (brats_run / "README.md").read_text()
