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
    from MedSynthLib.schema.errors import InputError
    from MedSynthLib.training.data import cases_by_name, load_prepared_volume, read_prepared_set, volume_file_name

    normalization, sources = read_prepared_set(tmp_path / "set")
    assert normalization == "percentile" and sorted(s.name for s in sources) == sorted(CASE_IDS)
    # The images were rounded: unpacking records the hashes of the volumes it wrote, so they are checked again.
    assert all(s.volume_sha256 is not None for s in sources)
    manifest = json.loads((tmp_path / "set" / "prepared_set.json").read_text())
    assert "packed_images" not in manifest and "int16 steps" in manifest["unpacked_images"]
    for source in sources:
        with np.load(prepared / volume_file_name(source.key, normalization)) as a, \
                np.load(tmp_path / "set" / volume_file_name(source.key, normalization)) as b:
            assert np.array_equal(a["labels"], b["labels"]) and str(a["normalizers"]) == str(b["normalizers"])
            error = np.abs(a["images"].astype(np.float64) - b["images"].astype(np.float64))
            # Half a step of rounding, plus float16's own (at most 2^-11 of the value) on the way back.
            assert 0 < error.max() <= pack.step_of(normalization) / 2 + 2 ** -11
    for source in sources:
        assert load_prepared_volume(source, normalization).key == source.key  # each verified against its hash
    _flip_a_bit(tmp_path / "set", manifest)
    damaged = cases_by_name(sources)[CASE_IDS[0]]
    with pytest.raises(InputError, match="unreadable prepared volume|sha256 differs"):
        load_prepared_volume(damaged, normalization)


# --- damaged volumes: one line naming the file, exit status 2, no run folder left ------------------


def _volume_of(folder: Path, manifest: dict, case: str) -> Path:
    return folder / f"{manifest['cases'][case]}.npz"


def _truncate_a_volume(folder: Path, manifest: dict) -> None:
    """A copy cut short (a transfer stopped): no longer a zip archive."""
    with open(_volume_of(folder, manifest, CASE_IDS[0]), "r+b") as handle:
        handle.truncate(handle.seek(0, 2) // 2)


def _flip_a_bit(folder: Path, manifest: dict) -> None:
    """One bit of the stored images flipped (a disk or a copy that damaged it)."""
    volume = _volume_of(folder, manifest, CASE_IDS[0])
    data = bytearray(volume.read_bytes())
    data[len(data) // 2] ^= 0x10
    volume.write_bytes(bytes(data))


def _swap_two_volumes(folder: Path, manifest: dict) -> None:
    """Two sound volumes under each other's names: each loads, but is another patient's."""
    a, b = (_volume_of(folder, manifest, case) for case in CASE_IDS[:2])
    a.rename(folder / "swap")
    b.rename(a)
    (folder / "swap").rename(b)


def _rewrite(volume: Path, **arrays) -> None:
    with np.load(volume) as data:
        contents = {name: data[name] for name in data.files}
    contents.update(arrays)
    np.savez(volume, **contents)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nan_images(folder: Path, manifest: dict) -> None:
    """A readable volume whose images are all NaN, its manifest entry made to match (a set prepared so)."""
    volume = _volume_of(folder, manifest, CASE_IDS[0])
    with np.load(volume) as data:
        images = np.full_like(data["images"], np.nan)
    _rewrite(volume, images=images)
    manifest["volume_sha256"][CASE_IDS[0]] = _sha256(volume)


def _nan_images_in_an_older_set(folder: Path, manifest: dict) -> None:
    """The same in a set whose manifest predates the volumes' sha256 (nothing to verify: still checked)."""
    _nan_images(folder, manifest)
    del manifest["volume_sha256"]


def _missing_array(folder: Path, manifest: dict) -> None:
    volume = _volume_of(folder, manifest, CASE_IDS[0])
    with np.load(volume) as data:
        contents = {name: data[name] for name in data.files if name != "normalizers"}
    np.savez(volume, **contents)
    manifest["volume_sha256"][CASE_IDS[0]] = _sha256(volume)


@pytest.mark.parametrize("change, words", [
    (_truncate_a_volume, ["unreadable", "prepare"]),
    (_flip_a_bit, ["prepare"]),
    (_swap_two_volumes, ["sha256", "prepare"]),
    (_nan_images, ["NaN"]),
    (_nan_images_in_an_older_set, ["NaN"]),
    (_missing_array, ["normalizers"]),
], ids=["truncated", "bit-flip", "swapped", "nan-images", "nan-images-older-manifest", "missing-array"])
def test_a_damaged_prepared_volume_is_one_line_naming_it_and_leaves_no_run(prepared: Path, tmp_path: Path, capsys,
                                                                          change, words) -> None:
    broken = _broken_copy(prepared, tmp_path / "set", change)
    manifest = json.loads((broken / "prepared_set.json").read_text())
    config = write_config(tmp_path / "micro.json", steps=2)
    args = ["train", "--data", str(broken), "-o", str(tmp_path / "run"), "--config", str(config), "--device", "cpu",
            "--threads", "1"]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert str(_volume_of(broken, manifest, CASE_IDS[0])) in line, line
    assert all(word in line for word in words), line
    assert not (tmp_path / "run").exists()


def test_a_failed_run_in_an_empty_folder_given_to_it_leaves_the_folder_empty(prepared: Path, tmp_path: Path,
                                                                           capsys) -> None:
    """-o naming an empty folder the user made: the run removes what it wrote there, not the folder."""
    broken = _broken_copy(prepared, tmp_path / "set", _truncate_a_volume)
    (tmp_path / "run").mkdir()
    config = write_config(tmp_path / "micro.json", steps=2)
    assert main(["train", "--data", str(broken), "-o", str(tmp_path / "run"), "--config", str(config),
                 "--device", "cpu"]) == 2
    one_error_line(capsys)
    assert (tmp_path / "run").is_dir() and not any((tmp_path / "run").iterdir())


def test_a_zscore_volume_without_signal_in_its_brain_is_refused_at_once(prepared: Path, tmp_path: Path,
                                                                         capsys) -> None:
    """A z-score volume whose brain is all background: the model's floor could not be found (at export, once)."""
    from MedSynthLib.synthesis.normalize import ZSCORE_KINDS, HealthyTissueZScore

    def dark_zscore_set(folder: Path, manifest: dict) -> None:
        manifest["normalization"] = "tissue_zscore"
        normalizer = HealthyTissueZScore(1.0, 1.0, ZSCORE_KINDS["tissue_zscore"], "tissue_zscore").to_json()
        for case, key in manifest["cases"].items():
            volume = folder / f"{key}.npz"
            with np.load(volume) as data:
                images = np.full_like(data["images"], -1.0)  # 1 - scale: below the scanner's 0 everywhere
            renamed = folder / f"{key}-tissue_zscore{ZSCORE_KINDS['tissue_zscore']:g}.npz"
            volume.rename(renamed)
            _rewrite(renamed, images=images, normalizers=json.dumps({m: normalizer for m in
                                                                     ("t1", "t1ce", "t2", "flair")}))
            manifest["volume_sha256"][case] = _sha256(renamed)

    broken = _broken_copy(prepared, tmp_path / "set", dark_zscore_set)
    config = write_config(tmp_path / "micro.json", steps=2, normalization="tissue_zscore")
    assert main(["train", "--data", str(broken), "-o", str(tmp_path / "run"), "--config", str(config),
                 "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert str(broken) in line and ".npz" in line and "signal" in line, line
    assert not (tmp_path / "run").exists()


def test_prepare_records_each_volume_files_sha256(prepared: Path) -> None:
    manifest = json.loads((prepared / "prepared_set.json").read_text())
    assert manifest["volume_sha256"] == {case: _sha256(prepared / f"{key}.npz")
                                         for case, key in manifest["cases"].items()}


def test_a_set_from_before_the_volume_hashes_is_read_unverified(prepared: Path, tmp_path: Path) -> None:
    from MedSynthLib.training.data import read_prepared_set
    from MedSynthLib.training.train import _load_volume

    older = _broken_copy(prepared, tmp_path / "set", lambda f, m: m.pop("volume_sha256"))
    normalization, sources = read_prepared_set(older)
    assert all(s.volume_sha256 is None for s in sources)
    for source in sources:
        volume = _load_volume(source, tmp_path / "cache", normalization, source.key)
        assert volume.key == source.key
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("change, words", [
    (lambda f, m: m.update(volume_sha256=["not", "a", "map"]), ["volume_sha256"]),
    (lambda f, m: m["volume_sha256"].pop(CASE_IDS[1]), ["volume_sha256", CASE_IDS[1]]),
    (lambda f, m: m["volume_sha256"].update({CASE_IDS[1]: "xyz"}), ["volume_sha256", CASE_IDS[1]]),
], ids=["not-a-map", "a-case-without", "not-a-hash"])
def test_a_bad_volume_hash_record_is_one_line(prepared: Path, tmp_path: Path, capsys, change, words) -> None:
    broken = _broken_copy(prepared, tmp_path / "set", change)
    config = write_config(tmp_path / "micro.json", steps=2)
    assert main(["train", "--data", str(broken), "-o", str(tmp_path / "run"), "--config", str(config),
                 "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert "prepared_set.json" in line and all(word in line for word in words), line
    assert not (tmp_path / "run").exists()


def _corrupt_cache(brats_data: Path, to: Path) -> tuple[Path, Path]:
    """A copy of the shared training cache with one percentile entry cut short; the entry and its case."""
    from MedSynthLib.training.data import case_key, volume_file_name

    shutil.copytree(training_cache_of(brats_data), to)
    case = brats_data / CASE_IDS[0]
    entry = to / volume_file_name(case_key(case), "percentile")
    assert entry.is_file()
    with open(entry, "r+b") as handle:
        handle.truncate(1000)
    return entry, case


def test_a_corrupt_cache_entry_is_derived_again_with_one_notice(brats_data: Path, prepared: Path, tmp_path: Path,
                                                                capsys) -> None:
    from MedSynthLib.training.data import case_key, prepare_volume

    entry, case = _corrupt_cache(brats_data, tmp_path / "cache")
    capsys.readouterr()
    volume = prepare_volume(case, tmp_path / "cache", "percentile", case_key(case))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(entry) in err[0] and str(case) in err[0], err
    with np.load(prepared / entry.name) as sound, np.load(entry) as again:
        for name in ("labels", "images"):
            assert np.array_equal(volume.labels if name == "labels" else volume.images, sound[name])
            assert np.array_equal(again[name], sound[name])


def test_prepare_derives_a_corrupt_cache_entry_again_and_hashes_the_sound_volume(brats_data: Path, prepared: Path,
                                                                                 tmp_path: Path, capsys) -> None:
    entry, case = _corrupt_cache(brats_data, tmp_path / "cache")
    capsys.readouterr()
    assert main(["prepare", "--data", str(brats_data), "-o", str(tmp_path / "set"),
                 "--cache", str(tmp_path / "cache")]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if str(entry) in line]
    assert len(notices) == 1, notices
    manifest = json.loads((tmp_path / "set" / "prepared_set.json").read_text())
    assert manifest["volume_sha256"] == {c: _sha256(tmp_path / "set" / f"{key}.npz")
                                         for c, key in manifest["cases"].items()}
    with np.load(tmp_path / "set" / entry.name) as ours, np.load(prepared / entry.name) as sound:
        assert np.array_equal(ours["images"], sound["images"])


def test_train_with_a_corrupt_cache_entry_derives_it_again(brats_data: Path, tmp_path: Path, capsys) -> None:
    entry, _ = _corrupt_cache(brats_data, tmp_path / "cache")
    config = write_config(tmp_path / "micro.json", steps=2, val_every=1000)
    capsys.readouterr()
    assert main(["train", "--data", str(brats_data), "-o", str(tmp_path / "run"), "--config", str(config),
                 "--device", "cpu", "--cache", str(tmp_path / "cache")]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if str(entry) in line]
    assert len(notices) == 1 and "Traceback" not in notices[0], notices
    assert (tmp_path / "run" / "model").is_dir()
