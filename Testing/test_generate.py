"""``medsynth generate``: sampler configs, layouts loadable by nnU-Net v2 and MONAI, workers, resume.

Small phantom brains (Testing/conftest.py) and a random-weight tiny generator keep every
run to seconds; one test runs on two real BraTS cases, their tumour-only label maps and the
template.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO, phantom, write_random_model, write_volume
from MedSynthLib.cli import main
from MedSynthLib.schema.errors import MedSynthError
from MedSynthLib.generate.layouts import Layout
from MedSynthLib.generate.runner import default_cache
from MedSynthLib.generate.sampler import Sources, replay_case, validate_config
from MedSynthLib.generate.sources import Source
from MedSynthLib.schema.labels import Label, schema_to_tumour
from MedSynthLib.synthesis.networks import MODALITY_ORDER

# Edits sized for a 40-voxel phantom brain.
PHANTOM_CONFIG = {"kinds": {"transform": 1, "insert_brain": 2, "parametric": 1},
                  "transform": {"translate_mm": 3, "rotate_deg": 15, "scale_range": [0.9, 1.1]},
                  "parametric": {"radius_fraction": [0.15, 0.25]}}


@pytest.fixture(scope="session", autouse=True)
def medsynth_home(tmp_path_factory) -> Path:
    """The user's MedSynth folder, where generate keeps the keys of its source ids: a test folder, never the real
    home (session-wide, set before the session's datasets are made, so that their reruns find their keys; the
    command-line runs in subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("medsynth_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSYNTH_HOME", str(folder))
        yield folder


@pytest.fixture(scope="session")
def gen_data(tmp_path_factory) -> dict[str, Path]:
    """Three phantom case folders, two tumour-only label maps, a tiny model and a sampler config."""
    root = tmp_path_factory.mktemp("generate_data")
    for k in range(3):
        images, seg = phantom(seed=k)
        seg = np.roll(seg, k, axis=1)  # three patients, three tumours
        folder = root / "cases" / f"P{k}"
        for modality, array in images.items():
            write_volume(array, folder / f"P{k}_{modality}.nii.gz")
        write_volume(seg, folder / f"P{k}_seg.nii.gz")
        if k < 2:
            write_volume(np.roll(seg, 3 + k, axis=2), root / "segs" / f"S{k}_seg.nii.gz")
    model = write_random_model(root / "tiny", {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=2018)
    config = root / "sampler.json"
    config.write_text(json.dumps(PHANTOM_CONFIG))
    return {"cases": root / "cases", "segs": root / "segs", "model": model, "config": config}


def _argv(data: dict[str, Path], out: Path, *extra: str, n: int = 4, layout: str = "nnunet") -> list[str]:
    return ["generate", "-n", str(n), "--labels-from", str(data["cases"]), str(data["segs"]),
            "--edits", str(data["config"]), "--model", str(data["model"]), "--layout", layout, "-o", str(out),
            "--device", "cpu", "--precision", "fp32", "--seed", "7", "--quiet", *extra]


def _records(out: Path, unkeyed: bool = False) -> dict[str, dict]:
    """The completed cases' provenance.  A write cut by kill -9 leaves its hidden temporary file
    (``.NAME.json.XXXX.tmp.json``, never renamed into place): not a record.

    ``unkeyed``: with each source id replaced by the source's place among the card's sources (see :func:`_unkeyed`).
    """
    return {p.stem: json.loads(_unkeyed(out, p.read_text()) if unkeyed else p.read_text())
            for p in sorted((out / "provenance").glob("*.json")) if not p.name.startswith(".")}


def _unkeyed(out: Path, text: str) -> str:
    """``text`` of a complete dataset with each source id replaced by ``source<i>``, the source's place in the card's
    ``sources.ids`` (the order the sources were found in): every run draws its own key of the ids, so two runs' records
    compare equal only so."""
    ids = json.loads((out / "dataset_card.json").read_text())["sources"]["ids"]
    places = {source_id: f"source{i}" for i, source_id in enumerate(ids)}
    return re.sub(r"hmac-sha256:[0-9a-f]{16}", lambda m: places[m.group(0)], text)


def _dataset_sources(out: Path, sources: list[Source]) -> Sources:
    """Sources read from the files, under the ids ``out`` records (its key, in the test's MedSynth folder)."""
    from MedSynthLib.generate.keys import SourceKey
    from MedSynthLib.generate.sources import with_dataset_ids

    run_file = out / "generate.json"
    return Sources(with_dataset_ids(sources, SourceKey.recorded(json.loads(run_file.read_text())["source_key"],
                                                                 run_file)))


def _file_hashes(out: Path) -> dict[str, str]:
    """sha256 of every image array in the dataset, by relative path (the decoded voxels)."""
    import hashlib

    hashes = {}
    for path in sorted(out.rglob("*.nii.gz")):
        if ".staging" in path.parts or ".cache" in path.parts:
            continue
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        hashes[str(path.relative_to(out))] = hashlib.sha256(array.tobytes() + str(array.dtype).encode()).hexdigest()
    return hashes


@pytest.fixture(scope="session")
def nnunet_run(gen_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen_nnunet") / "out"
    assert main(_argv(gen_data, out)) == 0
    return out


# --- sampler configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ({"kinds": {"transform": 1}, "rotate": 3}, "unknown key(s) rotate"),
    ({"transform": {"scale_range": [1.3, 0.7]}}, "transform.scale_range low 1.3 is above high 0.7"),
    ({"transform": {"p_flip": 1.5}}, "transform.p_flip must lie in [0, 1]"),
    ({"kinds": {"transform": 0, "parametric": 0}}, "at least one kind"),
    ({"kinds": {"insert_template": 1}}, "kind 'insert_template' has probability 1 but needs --template"),
    ({"max_tries": 0}, "max_tries must be an integer in [1, 100]"),
    ("{not json", "not valid JSON"),
])
def test_bad_sampler_config_is_refused_before_anything_is_written(gen_data, tmp_path, capsys, config, message):
    path = tmp_path / "bad.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    out = tmp_path / "out"
    argv = _argv(gen_data, out)
    argv[argv.index("--edits") + 1] = str(path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    (("--labels-from", "/nonexistent/folder"), "/nonexistent/folder: --labels-from: no such folder"),
    (("-n", "0"), "-n must be at least 1"),
    (("--name", "bad-name"), "--name must be letters and digits"),
    (("--workers", "0"), "--workers must be at least 1"),
])
def test_bad_arguments_are_one_line_and_write_nothing(gen_data, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    argv = _argv(gen_data, out)
    if change[0] in argv:
        at = argv.index(change[0])
        argv[at + 1] = change[1]
        if change[0] == "--labels-from":
            del argv[at + 2]  # only the missing folder
    else:
        argv += list(change)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_an_output_under_a_file_is_one_line_and_writes_nothing(gen_data, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder\n")
    assert main(_argv(gen_data, blocker / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(blocker) in err and "not a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"] and blocker.read_text() == "not a folder\n"


def test_a_cache_that_is_a_file_is_one_line_and_writes_nothing(gen_data, tmp_path, capsys):
    blocker = tmp_path / "cache.txt"
    blocker.write_text("not a folder\n")
    out = tmp_path / "out"
    assert main(_argv(gen_data, out, "--cache", str(blocker))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(blocker) in err and "--cache" in err, err
    assert not out.exists() and blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("own_cache", [False, True], ids=["default_cache", "given_cache"])
def test_a_bad_source_after_good_ones_leaves_no_cache_file(gen_data, tmp_path, capsys, own_cache):
    """The good sources are read (and cached) before the bad one is reached: the run writes nothing all the same."""
    segs = tmp_path / "segs"
    shutil.copytree(gen_data["segs"], segs)
    bad = sitk.ReadImage(str(next(iter(sorted(segs.glob("*.nii.gz"))))))
    array = sitk.GetArrayFromImage(bad)
    array[array > 0] = 9  # outside both BraTS label conventions
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(bad)
    sitk.WriteImage(image, str(segs / "Z9_seg.nii.gz"))  # read after the good ones
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    argv = _argv(gen_data, out, *(["--cache", str(cache)] if own_cache else []))
    at = argv.index("--labels-from")
    argv[at + 2] = str(segs)  # the cases, then the tumour maps with the bad one
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Z9_seg.nii.gz" in err, err
    assert not out.exists()
    assert not cache.exists()


def _write_like(array: np.ndarray, like: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.realdata
def test_an_msd_tumour_map_reads_its_oedema_as_oedema(real_data, tmp_path):
    """MSD Task01 writes oedema 1 and core 2 (BraTS: core 1, oedema 2): read as BraTS 2023 it swapped them."""
    from MedSynthLib.generate.sources import prepare_tumour

    real = sitk.ReadImage(str(real_data / "brats2021" / "seg_only" / "BraTS2021_01541_seg.nii.gz"))
    seg = sitk.GetArrayFromImage(real)
    expected = np.select([seg == 1, seg == 2, seg == 4], [Label.NCR, Label.ED, Label.ET], 0)
    msd = _write_like(np.select([seg == 1, seg == 2, seg == 4], [2, 1, 3], 0).astype(np.uint8), real,
                      tmp_path / "maps" / "BRATS_001.nii.gz")
    cache = tmp_path / "cache"
    assert np.array_equal(np.load(prepare_tumour(msd, cache).cache_file), expected)
    assert np.array_equal(np.load(prepare_tumour(msd, cache, "msd").cache_file), expected)
    # The user's word wins over the shape, and each reading has its own cache file.
    as_2023 = np.load(prepare_tumour(msd, cache, "brats2023").cache_file)
    assert np.count_nonzero(as_2023 == Label.ED) == np.count_nonzero(expected == Label.NCR)
    assert np.array_equal(np.load(prepare_tumour(msd, cache).cache_file), expected)


def test_a_tumour_map_that_reads_two_ways_is_one_line_until_its_convention_is_given(gen_data, tmp_path, capsys):
    """A map holding only values 1 and 3 is BraTS 2023 (core, enhancing) or MSD (oedema, enhancing)."""
    segs = tmp_path / "segs"
    like = sitk.ReadImage(str(sorted(gen_data["segs"].glob("*.nii.gz"))[0]))
    array = sitk.GetArrayFromImage(like)
    _write_like(np.where(array > 0, np.where(array == 4, 3, 1), 0).astype(array.dtype), like, segs / "A_seg.nii.gz")
    out = tmp_path / "out"
    argv = _argv(gen_data, out, n=1)
    argv[argv.index("--labels-from") + 2] = str(segs)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "A_seg.nii.gz" in err and "--label-convention" in err, err
    assert not out.exists()
    assert main(argv + ["--label-convention", "msd"]) == 0
    run = json.loads((out / "generate.json").read_text())
    assert run["label_convention"] == "msd"


def test_an_output_holding_an_input_folder_is_refused_even_with_overwrite(gen_data, tmp_path, capsys):
    """``-o`` above a --labels-from folder: --overwrite would delete the user's cases with the old output."""
    cases = Path(shutil.copytree(gen_data["cases"], tmp_path / "mine" / "cases"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = _argv(gen_data, tmp_path / "mine", "--overwrite")
    argv[argv.index("--labels-from") + 1] = str(cases)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"holds the input {cases}" in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("where", ["output", "cache"])
def test_an_output_inside_an_input_folder_is_refused(gen_data, tmp_path, capsys, where):
    """``-o`` (or ``--cache``) inside a --labels-from folder wrote the dataset, and a cache of label maps derived
    from the patients, among the patients' own case folders; refused in one line, nothing written there."""
    cases = Path(shutil.copytree(gen_data["cases"], tmp_path / "cases"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    inside = cases / "P0" / "derived"
    argv = _argv(gen_data, inside if where == "output" else tmp_path / "out",
                 *(["--cache", str(inside)] if where == "cache" else []))
    argv[argv.index("--labels-from") + 1] = str(cases)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(inside) in err and f"inside the input {cases}" in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_config_defaults_are_filled_and_kept():
    config = validate_config({"kinds": {"parametric": 2}, "transform": {"rotate_deg": 5}})
    assert config["kinds"]["parametric"] == 2.0 and config["transform"]["rotate_deg"] == 5.0
    assert config["transform"]["scale_range"] == [0.7, 1.3]


# --- layouts --------------------------------------------------------------------------------------


def test_nnunet_layout_passes_nnunets_integrity_check(nnunet_run, tmp_path):
    pytest.importorskip("nnunetv2")
    import shutil

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = nnunet_run / "Dataset501_BrainTumourSynth"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                              "enhancing tumor": [3]} and meta["regions_class_order"] == [1, 2, 3]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir())[:4] == [
        f"BrainTumourSynth_00000_000{c}.nii.gz" for c in range(4)]
    verify_dataset_integrity(str(folder), 1)
    # The check can fail: a label value outside the declared labels is reported.
    broken = Path(shutil.copytree(folder, tmp_path / "Dataset502_Broken"))
    label_path = broken / "labelsTr" / "BrainTumourSynth_00000.nii.gz"
    image = sitk.ReadImage(str(label_path))
    array = sitk.GetArrayFromImage(image)
    array[array > 0] = 7
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(label_path))
    with pytest.raises(Exception):
        verify_dataset_integrity(str(broken), 1)


def test_labels_follow_each_layouts_convention_and_replay(gen_data, nnunet_run, tmp_path):
    """nnU-Net/MSD labels 1 ED / 2 NCR / 3 ET; every case rebuilds from its record exactly."""
    from MedSynthLib.generate.sources import find_sources, prepare_case, prepare_tumour

    cases, tumours = find_sources([gen_data["cases"], gen_data["segs"]])
    cache = default_cache()
    sources = _dataset_sources(nnunet_run, [prepare_case(c, cache) for c in cases] +
                               [prepare_tumour(t, cache) for t in tumours])
    for case_id, record in _records(nnunet_run).items():
        generation = dict(record["generation"], edits=record["edits"])
        rebuilt = replay_case(generation, sources)
        label_file = nnunet_run / record["files"]["seg"]
        on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
        full = sources.by_id[generation["base"]].to_full(rebuilt.array)
        np.testing.assert_array_equal(on_disk, schema_to_tumour(full, "msd"))
        assert record["grid"]["size"] == [44, 48, 40]
        counts = record["tumour"]["voxels"]
        assert [int((on_disk == v).sum()) for v in (1, 2, 3)] == [counts["ED"], counts["NCR"], counts["ET"]]


def shared_cache(nnunet_run: Path) -> list[str]:
    """``--cache`` of the session's first run (the default cache, in the session's MedSynth folder), named: later runs
    whose subject is not the anatomy read it instead of deriving the three phantoms' anatomy again, also where a
    test sets another MedSynth folder (the workers and kill -9 tests derive theirs)."""
    return ["--cache", str(default_cache())]


def test_msd_layout_loads_with_monai(gen_data, nnunet_run, tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    out = tmp_path / "msd"
    assert main(_argv(gen_data, out, *shared_cache(nnunet_run), n=2, layout="msd")) == 0
    folder = out / "Task501_BrainTumourSynth"
    datalist = load_decathlon_datalist(str(folder / "dataset.json"), data_list_key="training", base_dir=str(folder))
    assert len(datalist) == 2
    item = LoadImaged(keys=["image", "label"])(datalist[0])
    image, label = np.asarray(item["image"]), np.asarray(item["label"])
    assert image.shape == (44, 48, 40, 4) and label.shape == (44, 48, 40)
    assert set(np.unique(label)) <= {0, 1, 2, 3} and (label > 0).any()
    record = _records(out)["BrainTumourSynth_00000"]
    # Channel 0 is FLAIR (MSD order): the same voxels as the provenance's FLAIR hash.
    from MedSynthLib.schema.provenance import array_sha256

    flair = np.ascontiguousarray(image[..., 0].transpose(2, 1, 0)).astype(np.int16)
    assert array_sha256(flair) == record["images_sha256"]["flair"]


@pytest.mark.parametrize("layout, suffix, et_value", [("brats2021", "_t1ce", 4), ("brats2023", "-t1c", 3)])
def test_brats_layouts_read_back_as_their_release(gen_data, nnunet_run, tmp_path, layout, suffix, et_value):
    from MedSynthLib.cases.readers import detect_convention, read_case

    out = tmp_path / layout
    assert main(_argv(gen_data, out, *shared_cache(nnunet_run), n=1, layout=layout)) == 0
    case_id = Layout(layout).case_id(0)
    folder = out / case_id
    assert (folder / f"{case_id}{suffix}.nii.gz").is_file()
    assert detect_convention(folder) == layout
    case = read_case(folder)
    record = _records(out)[case_id]
    counts = record["tumour"]["voxels"]
    assert int((case.tumour == Label.ET).sum()) == counts["ET"] and int((case.tumour == Label.ED).sum()) == counts["ED"]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case_id}{'_seg' if layout == 'brats2021' else '-seg'}.nii.gz")))
    assert int((seg == et_value).sum()) == counts["ET"]


# --- determinism, workers, resume ----------------------------------------------------------------


def test_case_i_is_the_same_whatever_the_number_of_workers(gen_data, nnunet_run, tmp_path):
    out = tmp_path / "two_workers"
    assert main(_argv(gen_data, out, "--workers", "2")) == 0
    one, two = _records(nnunet_run, unkeyed=True), _records(out, unkeyed=True)
    assert one.keys() == two.keys() and len(one) == 4
    for case_id in one:
        assert one[case_id]["generation"] == two[case_id]["generation"]
        assert one[case_id]["edits"] == two[case_id]["edits"]
        assert one[case_id]["labels_sha256"] == two[case_id]["labels_sha256"]
        assert one[case_id]["images_sha256"] == two[case_id]["images_sha256"]
    if Path("/proc/self/status").exists():
        # Two spawned workers, each within the memory model the budget checks inputs against
        # (fixed part + bytes per voxel of the largest grid it synthesised).
        from MedSynthLib.schema.budget import SYNTHESIS_BYTES_PER_VOXEL, SYNTHESIS_FIXED_BYTES

        workers = {r["worker"]["pid"] for r in two.values()}
        assert len(workers) == 2 and os.getpid() not in workers
        voxels = max(int(np.prod(r["edit_grid"]["grid"]["size"])) for r in two.values())
        bound_mb = (SYNTHESIS_FIXED_BYTES + SYNTHESIS_BYTES_PER_VOXEL * voxels) / 2 ** 20
        assert all(0 < r["worker"]["peak_rss_mb"] <= bound_mb for r in two.values())


def test_a_different_seed_changes_the_cases(gen_data, nnunet_run, tmp_path):
    out = tmp_path / "seed8"
    argv = _argv(gen_data, out, *shared_cache(nnunet_run), n=2)
    argv[argv.index("--seed") + 1] = "8"
    assert main(argv) == 0
    assert [r["labels_sha256"] for r in _records(out).values()] != [
        r["labels_sha256"] for r in list(_records(nnunet_run).values())[:2]]


def test_the_appearance_spread_reaches_every_case_the_card_and_the_run(gen_data, nnunet_run, tmp_path, capsys):
    from test_synthesis_seed import STYLED, _model

    styled = _model(tmp_path / "styled", STYLED)
    out = tmp_path / "spread"
    argv = _argv(gen_data, out, *shared_cache(nnunet_run), "--appearance-spread", "0.5", n=2)
    argv[argv.index("--model") + 1] = str(styled)
    assert main(argv) == 0
    records = _records(out)
    assert len(records) == 2 and all(r["appearance_spread"] == 0.5 and r["seed_effective"] for r in records.values())
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["appearance_spread"] == 0.5 and "--appearance-spread 0.5" in card["command"]
    assert "appearance spread: 0.5;" in (out / "README.md").read_text()
    assert json.loads((out / "generate.json").read_text())["appearance_spread"] == 0.5
    # Resuming the folder at another spread would mix two runs: refused, nothing touched.
    before = _file_hashes(out)
    assert main([a for a in argv if a not in ("--appearance-spread", "0.5")]) == 2
    assert "holds a generate run with other settings (appearance_spread)" in capsys.readouterr().err
    assert _file_hashes(out) == before
    # A spread out of range: one line, exit 2, nothing written.
    bad = tmp_path / "bad"
    assert main(_argv(gen_data, bad, "--appearance-spread", "2.5", n=1)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "medsynth: error: --appearance-spread must be a number from 0 to 2, got 2.5"]
    assert not bad.exists()
    # Within that range but past the model's own limit (it declares none: 1): refused before anything is written.
    assert main(_argv(gen_data, bad, "--appearance-spread", "1.5", n=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--appearance-spread 1.5 is wider than model" in err[0] and "(up to 1: " in err[0], err
    assert not bad.exists()


def _wait_for_a_case(process: subprocess.Popen, out: Path, timeout_s: float = 300.0) -> None:
    """Return once the run has completed a case (or ended, or timed out): the moment to kill it mid-run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if _records(out):
            return
        time.sleep(0.01)


def test_resume_after_kill_9_gives_the_uninterrupted_dataset(gen_data, nnunet_run, tmp_path):
    out = tmp_path / "killed"
    argv = _argv(gen_data, out)
    command = [sys.executable, "-m", "MedSynthLib", *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_a_case(process, out)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    done_before = len(_records(out))
    assert 1 <= done_before < 4, f"the kill should land mid-run ({done_before} of 4 complete)"
    assert not (out / "README.md").exists()
    assert main(argv) == 0  # resumes
    assert len(_records(out)) == 4
    resumed, reference = _records(out, unkeyed=True), _records(nnunet_run, unkeyed=True)
    for case_id in reference:
        for key in ("generation", "edits", "labels_sha256", "images_sha256", "privacy", "tumour"):
            assert resumed[case_id][key] == reference[case_id][key], (case_id, key)
    assert _file_hashes(out) == _file_hashes(nnunet_run)
    assert json.loads((out / "Dataset501_BrainTumourSynth" / "dataset.json").read_text())["numTraining"] == 4


@pytest.mark.parametrize("stop", [KeyboardInterrupt, MedSynthError])
def test_a_cancelled_overwrite_keeps_the_old_dataset(gen_data, nnunet_run, tmp_path, monkeypatch, capsys, stop):
    """``--overwrite`` interrupted while the new cases are made: the old dataset is back, whole (it was deleted
    before the new run began)."""
    import MedSynthLib.generate.runner as runner

    out = tmp_path / "ds"
    shutil.copytree(nnunet_run, out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        raise stop("stopped while the cases were made")

    monkeypatch.setattr(runner, "_run_cases", interrupted)
    assert main(_argv(gen_data, out, "--overwrite", "--seed", "8")) == (130 if stop is KeyboardInterrupt else 2)
    capsys.readouterr()
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # nothing set aside is left


def test_an_overwrite_that_completes_leaves_no_old_copy(gen_data, nnunet_run, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(nnunet_run, out)
    argv = _argv(gen_data, out, "--overwrite", n=2)
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert len(_records(out)) == 2  # the new dataset, not the old one's 4 cases


def test_resume_removes_the_temporary_file_a_kill_left(gen_data, nnunet_run, tmp_path):
    """kill -9 between a record's temporary write and its rename leaves ``.NAME.json.XXXX.tmp.json``;
    the resumed run that makes the case again removes it, so the dataset equals the uninterrupted one."""
    out = tmp_path / "cut"
    shutil.copytree(nnunet_run, out)
    (out / "provenance" / "BrainTumourSynth_00001.json").unlink()  # the case the kill interrupted
    stale = out / "provenance" / ".BrainTumourSynth_00001.json.k9x2ab7q.tmp.json"
    stale.write_text('{"case_id": "BrainTumourSynth_00001"')  # cut mid-write
    assert main(_argv(gen_data, out, *shared_cache(nnunet_run))) == 0
    assert not stale.exists()
    assert _file_bytes(out) == _file_bytes(nnunet_run)


def test_rerun_with_other_settings_is_refused(gen_data, nnunet_run, capsys):
    before = _file_hashes(nnunet_run)
    argv = _argv(gen_data, nnunet_run)
    argv[argv.index("--seed") + 1] = "99"
    assert main(argv) == 2
    assert "other settings (seed)" in capsys.readouterr().err
    assert _file_hashes(nnunet_run) == before


def test_rerun_with_a_smaller_n_is_refused(gen_data, nnunet_run, tmp_path, capsys):
    """-n below the complete cases on disk would write a dataset.json whose numTraining (and the card) leave
    cases out that imagesTr/labelsTr still hold: nnU-Net's integrity check then fails on the count."""
    out = Path(shutil.copytree(nnunet_run, tmp_path / "shrink"))
    before = _file_hashes(out)
    meta = (out / "Dataset501_BrainTumourSynth" / "dataset.json").read_text()
    assert main(_argv(gen_data, out, *shared_cache(nnunet_run), n=2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "BrainTumourSynth_00002" in err and "-n 4" in err, err
    assert _file_hashes(out) == before
    assert (out / "Dataset501_BrainTumourSynth" / "dataset.json").read_text() == meta


def test_torchrun_ranks_share_the_indices(gen_data, nnunet_run, tmp_path, monkeypatch):
    """Rank r of 2 makes the cases i with i % 2 == r; the last rank to finish writes the card."""
    out = tmp_path / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(_argv(gen_data, out, *shared_cache(nnunet_run))) == 0
    assert sorted(_records(out)) == ["BrainTumourSynth_00001", "BrainTumourSynth_00003"]
    assert not (out / "dataset_card.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(_argv(gen_data, out, *shared_cache(nnunet_run))) == 0
    assert (out / "dataset_card.json").exists()
    reference = _records(nnunet_run)
    assert {k: v["images_sha256"] for k, v in _records(out).items()} == {
        k: v["images_sha256"] for k, v in reference.items()}


def _file_bytes(out: Path) -> dict[str, str]:
    """sha256 of the bytes of every dataset file (images, labels, dataset.json, provenance without timings, its
    source ids unkeyed)."""
    import hashlib

    hashes = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or rel.parts[0] in (".cache", ".staging") or rel.name.startswith("dataset_card") \
                or rel.name in ("README.md", "generate.json"):
            continue
        if rel.parts[0] == "provenance":  # timings, CPU seconds and the device string differ between runs
            record = json.loads(_unkeyed(out, path.read_text()))
            for key in ("timings_s", "cpu_s", "stages", "software", "worker"):
                record.pop(key, None)
            data = json.dumps(record, sort_keys=True).encode()
        else:
            data = path.read_bytes()
        hashes[str(rel)] = hashlib.sha256(data).hexdigest()
    return hashes


def _descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (Linux /proc), children first."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child] + _descendants(child)
    return found


def _torchrun(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "MedSynthLib.cli", *argv]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finding torchrun's ranks reads Linux /proc")
def test_real_torchrun_two_ranks_equal_one_process_and_resume_after_kill_9(gen_data, nnunet_run, tmp_path):
    """``torchrun --nproc_per_node 2``: no process group, each rank its share by RANK/WORLD_SIZE.

    Both ranks' cases together are the single-process run's, byte for byte; after kill -9 of
    torchrun and both ranks mid-run, torchrun again completes the same dataset.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    cache = ["--cache", str(default_cache())]  # anatomy already derived: the ranks only make cases
    reference = _file_bytes(nnunet_run)
    assert len([k for k in reference if k.endswith(".nii.gz")]) == 4 * 5

    clean = tmp_path / "torchrun"
    done = subprocess.run(_torchrun(_argv(gen_data, clean) + cache), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("cases (") == 2  # one summary line per rank
    assert _file_bytes(clean) == reference
    card = json.loads((clean / "dataset_card.json").read_text())
    assert card["counts"]["cases"] == 4

    killed = tmp_path / "torchrun_killed"
    process = subprocess.Popen(_torchrun(_argv(gen_data, killed) + cache), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_a_case(process, killed)
        for pid in _descendants(process.pid)[::-1] + [process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        process.wait()
    done_before = len(_records(killed))
    assert 1 <= done_before < 4, f"the kill should land mid-run ({done_before} of 4 complete)"
    assert not (killed / "README.md").exists()
    resumed = subprocess.run(_torchrun(_argv(gen_data, killed) + cache), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    assert _file_bytes(killed) == reference


def test_plan_processes_one_gpu_per_local_rank_or_cpu_cores_shared():
    from MedSynthLib.generate.runner import plan_processes

    # torchrun on a node with 4 GPUs: rank 6 of 8 is local rank 2 of its node -> cuda:2.
    assert plan_processes("auto", 1, [0, 1, 2, 3], 8, 2, 4, 64).devices == ("cuda:2",)
    # CUDA_VISIBLE_DEVICES may leave fewer GPUs than local ranks: they share, round robin.
    assert plan_processes("auto", 1, [0, 1], 4, 3, 4, 64).devices == ("cuda:1",)
    # No torchrun: one worker process per GPU.
    assert plan_processes("auto", 1, [0, 1, 2], 1, 0, 1, 64).devices == ("cuda:0", "cuda:1", "cuda:2")
    # The CPU: the node's cores split over local ranks x workers, one thread at least.
    plan = plan_processes("cpu", 2, [], 1, 0, 1, 2)
    assert plan.devices == ("cpu", "cpu") and plan.threads == 1
    assert plan_processes("cpu", 1, [], 1, 0, 1, 2).threads == 2
    assert plan_processes("cpu", 2, [], 2, 1, 2, 16).threads == 4
    assert plan_processes("cpu", 4, [], 2, 1, 2, 2).threads == 1


def test_a_rank_loads_the_model_on_its_local_rank_gpu(gen_data, nnunet_run, tmp_path, monkeypatch):
    """No GPU needed: two GPUs are pretended and the engine records the device it is asked for."""
    import MedSynthLib.synthesis.synthesize as synthesize_module
    from MedSynthLib.generate import runner

    asked: list[str] = []
    real_engine = synthesize_module.SynthesisEngine

    class RecordingEngine(real_engine):  # type: ignore[misc, valid-type]
        def __init__(self, model, device="auto", precision="auto", log=lambda message: None, **options):
            asked.append(device)
            super().__init__(model, "cpu", precision, log, **options)

    monkeypatch.setattr(synthesize_module, "SynthesisEngine", RecordingEngine)
    monkeypatch.setattr(runner, "_cuda_devices", lambda device: [0, 1])
    out = tmp_path / "gpus"
    cache = ["--cache", str(default_cache())]
    for rank, local_rank in ((1, 1), (2, 0)):  # node 0's second GPU, node 1's first GPU
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert main(_argv(gen_data, out, "--device", "auto") + cache) == 0
    assert asked == ["cuda:1", "cuda:0"]
    assert sorted(_records(out)) == ["BrainTumourSynth_00001", "BrainTumourSynth_00002"]


def test_overwrite_is_refused_under_torchrun(gen_data, nnunet_run, capsys, monkeypatch):
    before = _file_hashes(nnunet_run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(_argv(gen_data, nnunet_run, "--overwrite")) == 2
    assert "--overwrite cannot be used under torchrun" in capsys.readouterr().err
    assert _file_hashes(nnunet_run) == before


# --- card and privacy ------------------------------------------------------------------------------


def test_card_and_anonymous_only(gen_data, nnunet_run, tmp_path):
    card = json.loads((nnunet_run / "dataset_card.json").read_text())
    assert card["model"]["name"] == "tiny" and len(card["model"]["sha256"]) == 64
    assert card["seed"] == 7 and card["counts"]["cases"] == 4 and len(card["privacy"]) == 4
    assert card["tumours"]["real_sources"]["with_tumour"] == 5
    assert (nnunet_run / "dataset_card.png").stat().st_size > 1000
    assert "## Privacy" in (nnunet_run / "README.md").read_text()
    own = [row for row in card["privacy"] if row["kind"] == "transform"]
    assert all(not row["anonymous"] and row["brain_dice_to_source"] == 1.0 for row in own)

    # Without the template no kind of case is anonymous: a patient's brain identifies the patient.
    insert_rows = [row for row in card["privacy"] if row["kind"] == "insert_brain"]
    assert all(not row["anonymous"] for row in insert_rows)
    out = tmp_path / "anonymous"
    assert main(_argv(gen_data, out, "--anonymous", n=3)) == 2
    assert not out.exists() or not any(out.iterdir())


def _markdown_table(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the body rows of the first table under ``heading`` in a markdown text."""
    after = text.split(heading, 1)[1]
    first = after.index("\n|") + 1
    lines = after[first:].split("\n\n", 1)[0].splitlines()  # a blank line ends the table
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return table[0], table[2:]  # table[1] is the |---| rule


def test_the_cards_tumour_table_puts_each_value_under_its_columns_header(nnunet_run):
    """Every cell of the README's tumour table belongs to the set its column names: the generated set's tumour
    centre and right-half share under "generated", the real sources' under "real sources"."""
    from MedSynthLib.generate.card import _fmt_q

    card = json.loads((nnunet_run / "dataset_card.json").read_text())
    header, rows = _markdown_table((nnunet_run / "README.md").read_text(), "## Tumours")
    assert header == ["", "generated", "real sources"] and all(len(row) == 3 for row in rows), rows

    def values(summary: dict) -> list[str]:
        """One set's values, in the table's row order."""
        location = summary["relative_location"]
        assert location, "the phantom run's two sets both have located tumours"
        return [str(summary["with_tumour"]), _fmt_q(summary["whole_tumour_ml"]), _fmt_q(summary["tumour_core_ml"]),
                *(_fmt_q(summary["fractions"][key]) for key in ("NCR", "ED", "ET")),
                str(location["mean_RAS"]), f"{location['right_hemisphere_share']:g}"]

    for column, summary in (("generated", "generated"), ("real sources", "real_sources")):
        cells = [row[header.index(column)] for row in rows]
        assert cells == values(card["tumours"][summary]), (column, rows)
    # The sets are told apart by the columns only: no row names one of them.
    assert not any("generated" in row[0] or "real" in row[0] for row in rows), rows


def test_the_readme_opens_with_the_privacy_verdict(nnunet_run):
    """Synthetic images need not be anonymous: the README's first sentence says whether they are (as an exported
    case's README does), and dataset.json's description with it."""
    from MedSynthLib.generate.card import _readme

    def opening(readme: str) -> str:
        return readme.split("\n\n")[1]  # the first paragraph after the title

    card = json.loads((nnunet_run / "dataset_card.json").read_text())
    assert card["counts"]["anonymous"] == 0  # every phantom case is drawn in a patient's brain
    first = opening((nnunet_run / "README.md").read_text())
    assert "NOT anonymous" in first and "4 of 4 cases" in first, first
    assert "Every case here is **synthetic**" not in first
    description = json.loads((nnunet_run / "Dataset501_BrainTumourSynth" / "dataset.json").read_text())["description"]
    assert "NOT anonymous: 4 of 4 cases" in description, description

    some = opening(_readme(dict(card, counts=dict(card["counts"], anonymous=1, derived_from_patient=3))))
    assert "NOT anonymous" in some and "3 of 4 cases" in some, some
    every = opening(_readme(dict(card, counts=dict(card["counts"], anonymous=4, derived_from_patient=0,
                                                   patients_own_tumour=0))))
    assert "NOT anonymous" not in every and "anonymous" in every, every


def test_a_model_without_validation_in_its_config_is_pointed_to_the_model_card(nnunet_run):
    """A model config with no validation (the test model's) or an empty record (the shipped models' ``{}``): the
    card says the config holds none of its own and points to the model card, not that the model has none."""
    from MedSynthLib.generate.card import _fidelity, _readme

    card = json.loads((nnunet_run / "dataset_card.json").read_text())
    shipped_like = dict(card, model=dict(card["model"], fidelity=_fidelity({"validation": {}})))
    for readme in ((nnunet_run / "README.md").read_text(), _readme(shipped_like)):
        assert "records no held-out validation of its own" in readme and "`docs/model_card.md`" in readme
        assert "records no validation." not in readme


def test_an_anonymous_dataset_carries_nothing_of_the_real_sources(gen_data, tmp_path):
    """--anonymous reads no patient source (its cases use none): no derived label map cached, no source id,
    no real tumour's statistics in the card; and no card records a folder (a folder name can name a patient)."""
    named = tmp_path / "Doe_John_MRN12345"
    named.mkdir()
    for case in sorted(gen_data["cases"].iterdir()):
        (named / case.name).symlink_to(case)
    out = tmp_path / "out"
    assert main(["generate", "-n", "1", "--labels-from", str(named), "--template", "--anonymous", "--model",
                 str(gen_data["model"]), "--layout", "brats2021", "-o", str(out), "--device", "cpu",
                 "--precision", "fp32", "--seed", "7", "--quiet"]) == 0
    assert not (out / ".cache").exists()
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["counts"]["anonymous"] == 1 and card["anonymous_only"]
    assert card["sources"]["ids"] == ["template"] and card["sources"]["real_cases"] == 0
    assert card["tumours"]["real_sources"]["with_tumour"] == 0
    assert "--labels-from DIR" in card["command"] and "--anonymous" in card["command"]
    texts = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".md")]
    assert len(texts) >= 4
    for path in texts:
        text = path.read_text()
        for word in ("MRN12345", str(tmp_path), "sha256:"):  # sha256:<hex> is a source id
            assert word not in text, f"{word!r} in {path.relative_to(out)}"


def test_privacy_is_the_label_maps_own_record(gen_data, nnunet_run):
    """Each case's privacy is the record its label map carried through the edits, shown in the card."""
    from MedSynthLib.generate.sources import find_sources, prepare_case, prepare_tumour
    from MedSynthLib.schema.provenance import privacy_of

    cases, tumours = find_sources([gen_data["cases"], gen_data["segs"]])
    cache = default_cache()
    sources = _dataset_sources(nnunet_run, [prepare_case(c, cache) for c in cases] +
                               [prepare_tumour(t, cache) for t in tumours])
    card_rows = {row["case_id"]: row for row in json.loads((nnunet_run / "dataset_card.json").read_text())["privacy"]}
    for case_id, record in _records(nnunet_run).items():
        rebuilt = replay_case(dict(record["generation"], edits=record["edits"]), sources)
        measured = privacy_of(rebuilt)
        assert measured.anatomy == "patient"  # every phantom case is drawn in a patient's brain
        expected = dict(measured.to_json(), anonymous=measured.anonymous()[0])
        assert {k: record["privacy"][k] for k in expected} == expected, case_id
        assert {k: card_rows[case_id][k] for k in expected} == expected, case_id
        assert record["privacy"]["reason"] == measured.anonymous()[1]
        if record["generation"]["kind"] == "insert_brain":
            assert measured.tumour_origin == "inserted"
    readme = (nnunet_run / "README.md").read_text()
    assert "| case | kind | anatomy | tumour | brain Dice to patient | tumour Dice to patient's own | anonymous |" in readme


def test_privacy_recognises_one_patient_in_two_folders():
    """A tumour-only file holding a case's own tumour (same voxels) counts as that patient's."""
    from MedSynthLib.generate.sampler import _same_patient

    case = Source("sha256:a", "case", None, {}, "t1", {"voxels": {"WT": 5}})
    same = Source("sha256:b", "tumour", None, {}, "t1", {"voxels": {"WT": 5}})
    other = Source("sha256:c", "tumour", None, {}, "t2", {"voxels": {"WT": 5}})
    assert _same_patient(case, same) and not _same_patient(case, other)


# --- real data ---------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_cases_tumour_label_maps_and_template(brats_cases, real_data, gen_data, tmp_path, monkeypatch):
    """A real BraTS case + the 4 tumour-only BraTS 2021 label maps + the template, two cases.

    One real case (was two): each is a full-size atlas-EM derivation, and one checks every property here
    (real brains with tumours counted among the sources, inserts into a real brain and into the template,
    the anatomy cache reused); several cases are generate's everyday work in the phantom tests above.
    """
    monkeypatch.setenv("MEDSYNTH_HOME", str(tmp_path / "home"))  # a default cache of this test's sources alone
    cases = tmp_path / "cases"
    cases.mkdir()
    for folder in brats_cases[:1]:
        (cases / folder.name).symlink_to(folder)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"kinds": {"insert_brain": 1, "insert_template": 1}}))
    out = tmp_path / "out"
    argv = ["generate", "-n", "2", "--labels-from", str(cases), str(real_data / "brats2021" / "seg_only"),
            "--template", "--edits", str(config), "--model", str(gen_data["model"]), "--layout", "brats2021",
            "-o", str(out), "--device", "cpu", "--seed", "3", "--quiet"]
    assert main(argv) == 0
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["sources"] == {**card["sources"], "real_cases": 1, "tumour_label_maps": 4, "template": True}
    assert card["tumours"]["real_sources"]["with_tumour"] == 5
    for row in card["privacy"]:
        assert row["kind"] in ("insert_brain", "insert_template")
        assert not row["anonymous"]  # a real tumour's shape identifies its patient, in any brain
        if row["kind"] == "insert_template":
            assert row["brain_dice_to_source"] is None and row["anatomy"] == "template"
    # The anatomy cache is reused: a second run derives nothing (same cache files, untouched).
    assert not (out / ".cache").exists()  # outside the dataset (test_generate_cache)
    cache = sorted(default_cache().glob("case-*.npy"))
    assert len(cache) == 2  # the case's derived label map and its brain-box crop
    stamps = [p.stat().st_mtime_ns for p in cache]
    assert main(argv[:-7] + ["-o", str(tmp_path / "out2"), "--cache", str(default_cache()), "--device", "cpu",
                             "--seed", "3", "--quiet"]) == 0
    assert [p.stat().st_mtime_ns for p in cache] == stamps


def test_a_case_folder_with_other_tumour_values_is_not_pointed_at_label_convention(gen_data, tmp_path, capsys):
    """generate's --label-convention reads tumour-only maps; a case folder's values follow its naming, so the error
    for a BraTS 2021-named case holding a 3 must not suggest that option."""
    cases = Path(shutil.copytree(gen_data["cases"], tmp_path / "cases"))
    seg_path = sorted(cases.glob("*/*_seg.nii.gz"))[0]
    seg = sitk.ReadImage(str(seg_path))
    array = sitk.GetArrayFromImage(seg)
    _write_like(np.where(array == 4, 3, array).astype(array.dtype), seg, seg_path)
    argv = _argv(gen_data, tmp_path / "out", n=1)
    argv[argv.index("--labels-from") + 1] = str(cases)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and seg_path.name in err and "[3]" in err, err
    assert "--label-convention" not in err, err


@pytest.mark.parametrize("precision, told, device", [("bf16", True, "cpu"), ("fp32", False, "cpu"),
                                                    ("bf16", True, "auto"), ("auto", False, "auto")])
def test_generate_says_once_that_bf16_is_emulated(gen_data, tmp_path, monkeypatch, capsys, precision, told, device):
    """``medsynth generate --precision bf16`` on a CPU that emulates bf16 (many times slower than fp32): one
    stderr line before the cases, as ``synthesize`` says it; the run goes on in bf16 as asked."""
    import MedSynthLib.synthesis.inference as inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # 'auto' is the CPU here, as on a machine without
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # a GPU (it crashed there: ff47cf3)
    argv = _argv(gen_data, tmp_path / "out", n=1)
    argv[argv.index("--precision") + 1] = precision
    argv[argv.index("--device") + 1] = device
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "emulated" in line]
    assert len(said) == (1 if told else 0), said
    run = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert run["precision"] == precision


def test_each_cases_record_names_the_model_as_the_run_does(gen_data, tmp_path, monkeypatch):
    """A registered model whose folder and config carry another name: every case's provenance named the config's
    name ('adv_ship' for the shipped default) while the card and generate.json named the registered one."""
    import shutil

    from MedSynthLib.synthesis.models import file_sha256

    registry = tmp_path / "registry"
    shutil.copytree(gen_data["model"], registry / "some_folder")
    weights = next((registry / "some_folder").glob("*.safetensors"))
    (registry / "registry.json").write_text(json.dumps(
        {"default": "medsynth-registered", "models": {"medsynth-registered": {
            "path": "some_folder", "sha256": file_sha256(weights)}}}))
    monkeypatch.setenv("MEDSYNTH_MODELS", str(registry))
    argv = _argv(gen_data, tmp_path / "out", n=2)
    argv[argv.index("--model") + 1] = "medsynth-registered"
    assert main(argv) == 0
    run = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert run["model"]["name"] == "medsynth-registered"
    names = {record["model"]["name"] for record in _records(tmp_path / "out").values()}
    assert names == {"medsynth-registered"}, names


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def sigint_as_in_a_terminal() -> None:
    """Run in a child before it starts: SIGINT takes its default action (Python then raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc (Linux)")
@pytest.mark.parametrize("after_s", [0.5, 3.0])
def test_ctrl_c_while_workers_start_ends_in_one_line(gen_data, tmp_path, after_s):
    """Ctrl+C in a terminal (SIGINT to the whole process group) while ``--workers 2`` start printed a
    KeyboardInterrupt traceback from each worker (interrupted importing torch or deriving a source).  Only the
    parent answers it now: one line, exit status 130, and no worker left behind."""
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "MedSynthLib", *_argv(gen_data, out, "--workers", "2")]
    # As from a terminal: a job started in the background (a CI runner's, a pytest-xdist worker) may ignore SIGINT,
    # and a program inherits that; medsynth then rightly ignores Ctrl+C too.
    process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=sigint_as_in_a_terminal)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(_children(process.pid)) < 2:
        time.sleep(0.05)
    workers = _children(process.pid)
    assert process.poll() is None and len(workers) >= 2, "the workers did not start"
    time.sleep(after_s)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1] == "medsynth: cancelled", err
    time.sleep(0.5)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
