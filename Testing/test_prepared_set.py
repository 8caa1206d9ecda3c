"""Prepared training sets (``medsynth prepare``): train where the scans are not, on exactly the same volumes.

A prepared set is the training cache of some case folders with a manifest.  Training on it must be the
same run as training on the folders (same volumes, same weights, same data record, so one can resume
the other), and every way a set can be wrong is one line and exit status 2.  The GPU transfer scripts
(``benchmarks/gpu_training``) pack a set into small parts and back: checked here for what they lose.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, load_benchmark, training_cache_of
from MedSynthLib.cli import main
from test_training import CASE_IDS, copy_run, load_tensors, resume_args, rewind, train_here, write_config

pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.fixture(scope="session")
def brats_data(phantom_brats) -> Path:
    return phantom_brats


@pytest.fixture(scope="session")
def four_step_run(brats_data: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared_four_step")
    train_here(brats_data, root / "run", write_config(root / "micro.json", steps=4, val_every=1000))
    return root / "run"


def prepare(data: Path, output: Path, *extra: str) -> int:
    return main(["prepare", "--data", str(data), "-o", str(output), "--cache", str(training_cache_of(data)), *extra])


@pytest.fixture(scope="session")
def prepared(brats_data: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("prepared") / "set"
    assert prepare(brats_data, output) == 0
    return output


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_a_prepared_set_holds_the_volumes_and_a_manifest_not_the_scans(brats_data: Path, prepared: Path) -> None:
    from MedSynthLib.training.data import case_key

    manifest = json.loads((prepared / "prepared_set.json").read_text())
    assert manifest["format"] == "medsynth-prepared-training-set" and manifest["normalization"] == "percentile"
    assert manifest["cases"] == {case: case_key(brats_data / case) for case in CASE_IDS}
    assert sorted(p.name for p in prepared.iterdir()) == sorted(
        ["prepared_set.json"] + [f"{key}.npz" for key in manifest["cases"].values()])


def test_training_on_a_prepared_set_is_training_on_its_case_folders(brats_data: Path, prepared: Path,
                                                                     four_step_run: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "micro.json", steps=4, val_every=1000)
    train_here(prepared, tmp_path / "run", config)
    ours = json.loads((tmp_path / "run" / "train_config.json").read_text())
    theirs = json.loads((four_step_run / "train_config.json").read_text())
    assert ours["data"] == theirs["data"]
    assert set(ours["data"]["case_sha256"]) == set(CASE_IDS)
    a = load_tensors(tmp_path / "run" / "model" / "weights.safetensors")
    b = load_tensors(four_step_run / "model" / "weights.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_a_run_on_case_folders_resumes_on_their_prepared_set(brats_data: Path, prepared: Path,
                                                             four_step_run: Path, tmp_path: Path) -> None:
    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    args = resume_args(brats_data, run)
    args[args.index("--data") + 1] = str(prepared)
    assert main(args) == 0
    a = load_tensors(run / "model" / "weights.safetensors")
    b = load_tensors(four_step_run / "model" / "weights.safetensors")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_prepare_refuses_an_existing_output(brats_data: Path, prepared: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    assert prepare(brats_data, prepared) == 2
    assert str(prepared) in one_error_line(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def _broken_copy(prepared: Path, to: Path, change) -> Path:
    shutil.copytree(prepared, to)
    manifest = json.loads((to / "prepared_set.json").read_text())
    change(to, manifest)
    (to / "prepared_set.json").write_text(json.dumps(manifest))
    return to


def _drop_a_volume(folder: Path, manifest: dict) -> None:
    (folder / f"{manifest['cases'][CASE_IDS[1]]}.npz").unlink()


@pytest.mark.parametrize("change, config, words", [
    (lambda f, m: m.update(format="something else"), {}, ["prepared_set.json", "format"]),
    (lambda f, m: m.update(cache_version=1), {}, ["prepared_set.json", "prepare it again"]),
    (lambda f, m: None, {"normalization": "tissue_zscore"}, ["set:", "prepared with percentile", "tissue_zscore"]),
    (lambda f, m: m["cases"].update({CASE_IDS[0]: "abc"}), {}, ["prepared_set.json", CASE_IDS[0], "sha256"]),
    (_drop_a_volume, {}, [CASE_IDS[1], "missing"]),
], ids=["format", "version", "other-normalisation", "key", "missing-volume"])
def test_a_bad_prepared_set_is_one_line_and_starts_nothing(prepared: Path, tmp_path: Path, capsys, change, config,
                                                           words) -> None:
    broken = _broken_copy(prepared, tmp_path / "set", change)
    config = write_config(tmp_path / "micro.json", steps=2, **config)
    args = ["train", "--data", str(broken), "-o", str(tmp_path / "run"), "--config", str(config), "--device", "cpu"]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert all(word in line for word in words), line
    assert not (tmp_path / "run").exists()


# --- the transfer scripts of benchmarks/gpu_training ------------------------------------------------


def _script(name: str):
    return load_benchmark(name, "benchmarks/gpu_training")


def _run_script(name: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_training" / f"{name}.py"), *args],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("where", [{}, {"folder": Path("cases/a"), "prepared": Path("set")}])
def test_a_training_case_comes_from_a_folder_or_a_prepared_set(where: dict) -> None:
    """A case names exactly one source: its folder or its prepared set (training reads it from there)."""
    from MedSynthLib.training.data import CaseSource

    with pytest.raises(ValueError, match="'a'"):
        CaseSource("a", **where)
    assert CaseSource("a", folder=Path("cases/a")).origin == Path("cases/a")
    assert CaseSource("a", prepared=Path("set"), key="0" * 64).origin == Path("set/a")


def test_packing_for_the_gpu_keeps_labels_and_statistics_and_rounds_images_to_half_a_step(
        prepared: Path, tmp_path: Path) -> None:
    _run_script("pack", str(prepared), str(tmp_path / "parts"), "--budgets-mb", "0.2", "50")
    parts = sorted((tmp_path / "parts").iterdir())
    assert len(parts) == 2 and all(any(part.glob("*.npz.xz")) for part in parts)  # the budgets split the cases
    _run_script("unpack", *map(str, parts), "-o", str(tmp_path / "set"))
    pack = _script("pack")
    from MedSynthLib.training.data import read_prepared_set, volume_file_name

    normalization, sources = read_prepared_set(tmp_path / "set")
    assert normalization == "percentile" and sorted(s.name for s in sources) == sorted(CASE_IDS)
    for source in sources:
        with np.load(prepared / volume_file_name(source.key, normalization)) as a, \
                np.load(tmp_path / "set" / volume_file_name(source.key, normalization)) as b:
            assert np.array_equal(a["labels"], b["labels"]) and str(a["normalizers"]) == str(b["normalizers"])
            error = np.abs(a["images"].astype(np.float64) - b["images"].astype(np.float64))
            # Half a step of rounding, plus float16's own (at most 2^-11 of the value) on the way back.
            assert 0 < error.max() <= pack.step_of(normalization) / 2 + 2 ** -11
