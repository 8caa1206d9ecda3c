"""No command writes its output inside a patient's case folder that it reads (``prepare``'s and ``export``'s rule).

A derived label map, a synthetic case or a model written among a patient's scans is taken for part of the case by
whoever reads or copies the folder next; ``labels``, ``synthesize`` and ``appearance`` wrote there without a word.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import write_phantom_case
from MedSynthLib.cli import main


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


def _refused(capsys, argv: list, output: Path, case: Path) -> None:
    """``argv`` exits 2 with one line naming ``output`` and the case folder it lies in, and writes nothing there."""
    before = _snapshot(case)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "", captured.err
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"medsynth: error: {output}: lies inside the case folder "), err
    assert "outside the patients' case folders" in err[0]
    assert _snapshot(case) == before and not output.exists()


@pytest.fixture()
def case(tmp_path: Path) -> Path:
    return write_phantom_case(tmp_path / "cases", 0)


@pytest.mark.parametrize("where", ["the case folder", "a sub-folder", "through a link"])
def test_labels_refuses_an_output_inside_the_case_folder(case: Path, tmp_path: Path, capsys, where: str) -> None:
    """``labels CASE -o CASE/labels.nii.gz`` wrote the derived map and its sidecar among the scans (exit 0)."""
    (tmp_path / "link").symlink_to(case)
    output = {"the case folder": case / "labels.nii.gz", "a sub-folder": case / "derived" / "labels.nii.gz",
              "through a link": tmp_path / "link" / "labels.nii.gz"}[where]
    _refused(capsys, ["labels", case, "-o", output], output, case)


def test_labels_refuses_an_output_beside_a_t1_given_from_a_case_folder(case: Path, capsys) -> None:
    """With ``--t1 FILE``, a T1 read from a case folder: the output is not written into that folder either."""
    output = case / "labels.nii.gz"
    _refused(capsys, ["labels", "--t1", case / f"{case.name}_t1.nii.gz", "-o", output], output, case)


def test_labels_beside_explicit_files_in_a_plain_folder_is_written(case: Path, tmp_path: Path, capsys) -> None:
    """A T1 in a folder that is no case folder (one file, any naming): the map may go beside it."""
    plain = tmp_path / "scans"
    plain.mkdir()
    shutil.copy(case / f"{case.name}_t1.nii.gz", plain / "anatomical.nii.gz")
    output = plain / "labels.nii.gz"
    assert main(["labels", "--t1", str(plain / "anatomical.nii.gz"), "--anatomy", "kmeans-t1",
                 "-o", str(output)]) == 0, capsys.readouterr().err
    assert output.is_file()


def test_synthesize_refuses_an_output_inside_the_case_folder_of_its_label_map(case: Path, tmp_path: Path,
                                                                            capsys) -> None:
    """A label map kept in a patient's case folder: ``synthesize`` wrote the synthetic case inside that folder, which
    ``synthesize --context`` already refuses."""
    from test_synthesis_seed import PLAIN, _model

    holder = tmp_path / "holder" / case.name
    shutil.copytree(case, holder)
    labels = tmp_path / "labels.nii.gz"
    assert main(["labels", str(case), "--anatomy", "kmeans-t1", "-o", str(labels)]) == 0
    for name in ("labels.nii.gz", "labels.json"):
        shutil.copy(tmp_path / name, holder / name)
    model = _model(tmp_path / "plain", PLAIN)
    output = holder / "synthetic"
    _refused(capsys, ["synthesize", holder / "labels.nii.gz", "--model", model, "--device", "cpu", "-o", output],
             output, holder)
    # A label map in a plain folder: the case may go beside it.
    assert main(["synthesize", str(labels), "--model", str(model), "--device", "cpu",
                 "-o", str(tmp_path / "synthetic")]) == 0


def test_appearance_refuses_a_model_written_inside_one_of_its_case_folders(tmp_path: Path, capsys) -> None:
    """``appearance MODEL --data ROOT -o ROOT/CASE/model`` wrote the new model folder among a case's scans."""
    import torch

    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator, NetworkConfig
    from MedSynthLib.training.data import case_key
    from test_training_spade import CONFIG

    root = tmp_path / "cases"
    cases = [write_phantom_case(root, seed) for seed in range(2)]
    network = NetworkConfig.from_json(CONFIG["network"])
    torch.manual_seed(5)
    state = {k: v.detach().contiguous() for k, v in Generator(network, backend="torch").state_dict().items()}
    model = write_model(tmp_path / "model", state, {
        "name": "styled", "network": CONFIG["network"],
        "intensity": {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER},
        "training": {"config": dict(CONFIG, val_cases=[]), "data": {"cases": 2,
                                                                   "case_sha256": [case_key(c) for c in cases]}}})
    output = cases[1] / "model_with_prior"
    _refused(capsys, ["appearance", model, "--data", root, "--patches", "2", "-o", output], output, cases[1])


@pytest.fixture()
def labels(case: Path, tmp_path: Path) -> Path:
    """The phantom case's label map, written outside the case folder."""
    output = tmp_path / "maps" / "labels.nii.gz"
    assert main(["labels", str(case), "--anatomy", "kmeans-t1", "-o", str(output)]) == 0
    return output


@pytest.mark.parametrize("command", ["insert", "replay"])
def test_tumour_edits_refuse_an_output_in_the_case_folder_of_a_segmentation_they_read(case: Path, labels: Path,
                                                                                       capsys, command) -> None:
    """``tumour insert --from CASE/..._seg.nii.gz -o CASE/inserted.nii.gz`` wrote the edited map among the scans of
    the patient whose tumour it took (exit 0); so did ``tumour replay --source`` of that segmentation."""
    seg = case / f"{case.name}_seg.nii.gz"
    output = case / "inserted.nii.gz"
    if command == "insert":
        argv = ["tumour", "insert", "--from", seg, "--into", labels, "-o", output]
    else:
        inserted = labels.with_name("inserted.nii.gz")
        assert main(["tumour", "insert", "--from", str(seg), "--into", str(labels), "-o", str(inserted)]) == 0
        argv = ["tumour", "replay", labels, "--edits", inserted, "--source", seg, "-o", output]
    _refused(capsys, argv, output, case)


@pytest.mark.parametrize("command", ["transform", "new", "random"])
def test_tumour_edits_refuse_an_output_in_the_case_folder_holding_their_label_map(case: Path, labels: Path,
                                                                                 capsys, command) -> None:
    """A label map kept in a patient's case folder: an edit of it was written into that folder too."""
    for name in ("labels.nii.gz", "labels.json"):
        shutil.copy(labels.with_name(name), case / name)
    kept = case / "labels.nii.gz"
    output = case / "edited.nii.gz"
    from test_cli import _brain_centre_ras

    options = {"transform": ["--translate", "2", "0", "0"], "random": ["--seed", "3"],
               "new": ["--centre", *_brain_centre_ras(kept), "--radius", "4", "--seed", "1"]}[command]
    words = ["tumour", kept] if command == "transform" else ["tumour", command, kept]
    _refused(capsys, [*words, *options, "-o", output], output, case)


@pytest.mark.parametrize("option", ["-o", "--cache"])
def test_train_refuses_a_run_or_cache_inside_one_of_its_case_folders(tmp_path: Path, capsys, option: str) -> None:
    """``train --data ROOT -o ROOT/CASE/run`` put its checkpoints, model and prepared-case cache among a patient's
    scans (``--cache ROOT/CASE/cache`` the cache)."""
    root = tmp_path / "cases"
    cases = [write_phantom_case(root, seed) for seed in range(2)]
    inside = cases[1] / ("run" if option == "-o" else "cache")
    argv = ["train", "--data", root, "--device", "cpu", "--steps", "1"]
    argv += ["-o", inside] if option == "-o" else ["-o", tmp_path / "run", "--cache", inside]
    _refused(capsys, argv, inside, cases[1])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["-o", "--work"])
def test_study_refuses_a_report_or_work_folder_inside_one_of_its_case_folders(tmp_path: Path, capsys,
                                                                                option: str) -> None:
    """``study --data ROOT -o ROOT/CASE/report`` (or ``--work ROOT/CASE/work``) wrote the study's report or its
    cache of trained arms and synthetic cases among a patient's scans."""
    root = tmp_path / "cases"
    cases = [write_phantom_case(root, seed) for seed in range(2)]
    inside = cases[0] / ("report" if option == "-o" else "work")
    argv = ["study", "--data", root, "--config", "micro", "--device", "cpu", "--quiet"]
    argv += ["-o", inside] if option == "-o" else ["-o", tmp_path / "report", "--work", inside]
    _refused(capsys, argv, inside, cases[0])
    assert not (tmp_path / "report").exists()
