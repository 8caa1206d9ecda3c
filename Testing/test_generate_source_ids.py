"""``medsynth generate``: the source ids a dataset records cannot be matched to the patients' files.

Anyone holding the source files (public BraTS, a hospital's archive) can hash them; ids made from those hashes
alone would name each synthetic case's patient.  The ids are keyed with a secret kept outside the dataset
(the user's MedSynth folder, ``MEDSYNTH_HOME`` here), so a resume on the computer that began the run still
checks that the sources are the same.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_volume
from MedSynthLib.cli import main
from test_generate import _argv, gen_data  # noqa: F401 - gen_data is the phantom sources' fixture

CASE = "BrainTumourSynth_00001"


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """The user's MedSynth folder, where generate keeps its keys (never the real home in a test)."""
    folder = tmp_path / "medsynth_home"
    monkeypatch.setenv("MEDSYNTH_HOME", str(folder))
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One anatomy cache for this module's runs (the phantoms' anatomy derived once)."""
    return tmp_path_factory.mktemp("source_ids_cache")


def _run(data: dict[str, Path], out: Path, cache: Path, *extra: str, n: int = 2) -> int:
    return main(_argv(data, out, "--cache", str(cache), *extra, n=n))


def _fingerprints(data: dict[str, Path]) -> set[str]:
    """What anyone holding the source files computes from them: the sha256 of each file, of each case's files
    together (as generate hashed them), and of each label array, as full hex and as 16-hex prefixes."""
    import SimpleITK as sitk

    from MedSynthLib.cases.readers import read_case
    from MedSynthLib.generate.sources import find_sources
    from MedSynthLib.schema.provenance import array_sha256

    cases, tumours = find_sources([data["cases"], data["segs"]])
    groups = []
    for folder in cases:
        case = read_case(folder, require_segmentation=True)
        groups.append([Path(case.files[k]) for k in sorted(case.files)])
    groups += [[path] for path in tumours]
    digests = set()
    for files in groups:
        together = hashlib.sha256()
        for path in files:
            together.update(b"\0file\0" + path.read_bytes())
            digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
            digests.add(array_sha256(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))
        digests.add(together.hexdigest())
    return digests | {d[:16] for d in digests}


def _texts(out: Path) -> dict[str, str]:
    """Every file of the dataset a reader gets (the anatomy cache given with --cache lies outside it)."""
    return {str(p.relative_to(out)): p.read_bytes().decode("latin-1") for p in sorted(out.rglob("*")) if p.is_file()}


def _recorded_ids(out: Path) -> dict[str, set[str]]:
    """The source ids each written file records, by file."""
    run = json.loads((out / "generate.json").read_text())
    card = json.loads((out / "dataset_card.json").read_text())
    found = {"generate.json": set(run["sources"]), "dataset_card.json sources": set(card["sources"]["ids"]),
             "dataset_card.json privacy": {row[k] for row in card["privacy"] for k in ("base", "tumour_source")
                                           if row[k]}}
    for path in sorted((out / "provenance").glob("*.json")):
        record = json.loads(path.read_text())
        ids = {record["generation"][k] for k in ("base", "tumour_source", "placement_brain")
               if record["generation"][k]}
        ids |= {edit["params"]["source"] for edit in record["edits"] if edit["params"].get("source")}
        found[f"provenance/{path.name}"] = ids
    return found


def test_source_ids_in_every_written_file_are_not_the_source_files_hashes(gen_data, cache, home, tmp_path):
    out = tmp_path / "out"
    assert _run(gen_data, out, cache, n=4) == 0
    recorded = _recorded_ids(out)
    everywhere = set().union(*recorded.values())
    assert len(recorded["generate.json"]) == 5  # three cases, two tumour-only maps
    assert recorded["dataset_card.json sources"] == recorded["generate.json"]
    assert everywhere <= recorded["generate.json"], recorded  # one id per source, the same in every file
    assert any("insert" in json.loads(p.read_text())["generation"]["kind"] for p in (out / "provenance").iterdir())
    prints = _fingerprints(gen_data)
    for name, text in _texts(out).items():
        for digest in prints:
            assert digest not in text, f"{name} holds {digest}, a hash of a source file"
    # The key lies outside the dataset, and no file of the dataset holds it.
    keys = [p for p in home.rglob("*") if p.is_file()]
    assert len(keys) == 1 and out not in keys[0].parents
    secret = keys[0].read_text().strip()
    assert len(secret) >= 32 and not any(secret in text for text in _texts(out).values())


def _cut_one_case(out: Path) -> dict[str, bytes]:
    """Remove one complete case's record (as a run stopped before its end) and return the files left."""
    (out / "provenance" / f"{CASE}.json").unlink()
    return {name: (out / name).read_bytes() for name in _texts(out)}


def test_a_resume_on_the_same_sources_rebuilds_the_case_with_the_same_ids(gen_data, cache, home, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(gen_data, out, cache) == 0
    before = json.loads((out / "provenance" / f"{CASE}.json").read_text())
    _cut_one_case(out)
    capsys.readouterr()
    assert _run(gen_data, out, cache) == 0
    assert "resuming, 1 of 2 cases already complete" in capsys.readouterr().err
    after = json.loads((out / "provenance" / f"{CASE}.json").read_text())
    assert after["generation"] == before["generation"] and after["edits"] == before["edits"]
    assert after["images_sha256"] == before["images_sha256"]


def _assert_refused(out: Path, left: dict[str, bytes], capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and all(word in err for word in words), err
    assert {name: (out / name).read_bytes() for name in _texts(out)} == left  # nothing written
    return err


def test_a_resume_without_the_key_is_refused_in_one_line(gen_data, cache, home, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(gen_data, out, cache) == 0
    left = _cut_one_case(out)
    shutil.rmtree(home)  # another computer, or the key deleted
    capsys.readouterr()
    assert _run(gen_data, out, cache) == 2
    _assert_refused(out, left, capsys, str(out / "generate.json"), "key", "--overwrite")
    assert not home.exists()


def test_a_resume_on_changed_sources_is_refused(gen_data, cache, home, tmp_path, capsys):
    data = dict(gen_data, cases=tmp_path / "cases")
    shutil.copytree(gen_data["cases"], data["cases"])
    out = tmp_path / "out"
    assert _run(data, out, cache) == 0
    left = _cut_one_case(out)
    seg = data["cases"] / "P0" / "P0_seg.nii.gz"  # another patient's scans under the same name
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    array[np.nonzero(array)[0][0], :, :] = 0
    seg.unlink()
    write_volume(array, seg)
    capsys.readouterr()
    assert _run(data, out, cache) == 2
    _assert_refused(out, left, capsys, str(out), "other settings (sources)")


def test_a_dataset_made_before_the_ids_were_keyed_is_refused_clearly(gen_data, cache, home, tmp_path, capsys):
    """Its files name the patients' source files: resuming would add more such records."""
    out = tmp_path / "out"
    assert _run(gen_data, out, cache) == 0
    run_file = out / "generate.json"
    run = json.loads(run_file.read_text())
    run.pop("source_key", None)
    run["sources"] = sorted(f"sha256:{i:016x}" for i in range(len(run["sources"])))  # as written before
    run_file.write_text(json.dumps(run, indent=2) + "\n")
    left = _cut_one_case(out)
    capsys.readouterr()
    assert _run(gen_data, out, cache) == 2
    err = _assert_refused(out, left, capsys, str(run_file), "--overwrite")
    assert re.search(r"before .*key", err), err
    assert _run(gen_data, out, cache, "--overwrite") == 0  # generated again, with keyed ids


def test_a_run_without_patient_sources_keeps_no_key_and_resumes(gen_data, home, tmp_path, capsys):
    """--anonymous reads no patient source: no key is drawn, and its dataset (as one made before the ids were keyed,
    which recorded only ``template``) resumes."""
    out = tmp_path / "out"
    argv = ["generate", "-n", "2", "--template", "--anonymous", "--model", str(gen_data["model"]), "--layout",
            "brats2021", "-o", str(out), "--device", "cpu", "--precision", "fp32", "--seed", "7", "--quiet"]
    assert main(argv) == 0
    assert json.loads((out / "generate.json").read_text())["sources"] == ["template"]
    assert "source_key" not in json.loads((out / "generate.json").read_text()) and not home.exists()
    _cut_one_case(out)
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming, 1 of 2 cases already complete" in capsys.readouterr().err
    assert (out / "provenance" / f"{CASE}.json").exists() and not home.exists()
