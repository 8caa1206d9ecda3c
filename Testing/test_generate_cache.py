"""``medsynth generate``: the anatomy cache (each patient source's derived label map) stays out of the dataset.

The cache's file names are hashes of fixed settings and the source files' bytes, which anyone holding MedSynth and
the files can compute: a cache inside OUT would ship every patient's label map with the dataset and name its files.
The default cache lies in the user's MedSynth folder (``MEDSYNTH_HOME`` here), shared by the runs on the same sources.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from MedSynthLib.cli import main
from test_generate import _argv, gen_data  # noqa: F401 - gen_data is the phantom sources' fixture

#: Image and array files: a label map can travel as any of them.
ARRAY_SUFFIXES = (".npy", ".npz", ".nii", ".nii.gz", ".nrrd", ".mha")


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "medsynth_home"
    monkeypatch.setenv("MEDSYNTH_HOME", str(folder))
    return folder


@pytest.fixture()
def data(gen_data, tmp_path) -> dict[str, Path]:  # noqa: F811
    """One phantom case and one tumour-only map (fewer derivations than the three of ``gen_data``)."""
    cases, segs = tmp_path / "src" / "cases", tmp_path / "src" / "segs"
    cases.mkdir(parents=True)
    segs.mkdir(parents=True)
    (cases / "P0").symlink_to(gen_data["cases"] / "P0")
    (segs / "S0_seg.nii.gz").symlink_to(gen_data["segs"] / "S0_seg.nii.gz")
    return dict(gen_data, cases=cases, segs=segs)


def _foreign_arrays(out: Path) -> list[str]:
    """Array and image files under ``out`` that are not one of the dataset's own cases (their provenance's files)."""
    own = set()
    for record in (out / "provenance").glob("*.json"):
        if not record.name.startswith("."):
            own |= set(json.loads(record.read_text())["files"].values())
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and p.name.endswith(ARRAY_SUFFIXES) and str(p.relative_to(out)) not in own)


def _no_derivation(monkeypatch) -> None:
    """Fail any derivation of a case's anatomy: a run that reuses its cache derives none."""
    import MedSynthLib.cases.anatomy as anatomy

    def refuse(*args, **kwargs):
        raise AssertionError("the anatomy was derived again instead of read from the cache")

    monkeypatch.setattr(anatomy, "derive_label_map", refuse)


def test_a_dataset_holds_no_patient_label_map_and_its_cache_is_the_users(data, home, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(data, out, n=2)) == 0
    assert len(list((out / "provenance").glob("*.json"))) == 2
    assert _foreign_arrays(out) == []
    assert not (out / ".cache").exists()
    cached = sorted(p.name for p in (home / "generate-cache").iterdir())
    assert any(name.startswith("case-") for name in cached) and any(name.startswith("tumour-") for name in cached)
    # Private to its user, as the keys are: it holds the patients' label maps.
    assert (home / "generate-cache").stat().st_mode & 0o077 == 0


def test_a_resume_and_another_run_reuse_the_users_cache(data, home, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(_argv(data, out, n=2)) == 0
    (out / "provenance" / "BrainTumourSynth_00001.json").unlink()  # as if killed before its last case
    capsys.readouterr()
    _no_derivation(monkeypatch)
    assert main(_argv(data, out, n=2)) == 0
    assert "resuming, 1 of 2 cases already complete" in capsys.readouterr().err
    assert main(_argv(data, tmp_path / "other", n=1)) == 0  # content-addressed: shared between datasets
    assert _foreign_arrays(out) == [] and _foreign_arrays(tmp_path / "other") == []


def _as_begun_before(out: Path, home: Path, foreign: bool = False) -> list[str]:
    """``out`` made into a dataset begun by a MedSynth that kept its default cache in ``OUT/.cache``: the cache
    moved there from the user's folder, its last case not written yet. Returns the cache's file names."""
    legacy = out / ".cache"
    shutil.move(str(home / "generate-cache"), str(legacy))
    (out / "provenance" / "BrainTumourSynth_00001.json").unlink()
    for name in ("dataset.json", "dataset_card.json", "README.md"):
        for path in out.rglob(name):
            path.unlink()
    if foreign:
        (legacy / "notes.txt").write_text("the user's own\n")
    return sorted(p.name for p in legacy.iterdir() if p.name.endswith(".npy"))


def test_a_dataset_begun_with_its_cache_inside_resumes_from_it_and_ends_without_it(data, home, tmp_path, monkeypatch,
                                                                                   capsys):
    out = tmp_path / "out"
    assert main(_argv(data, out, n=2)) == 0
    names = _as_begun_before(out, home)
    assert _foreign_arrays(out)  # the label maps the old default left in the dataset
    capsys.readouterr()
    _no_derivation(monkeypatch)
    assert main(_argv(data, out, n=2)) == 0
    assert "resuming, 1 of 2 cases already complete" in capsys.readouterr().err
    assert (out / "dataset_card.json").exists()
    assert _foreign_arrays(out) == [] and not (out / ".cache").exists()
    # Moved to the user's cache, where the next run on these sources finds them.
    assert set(names) <= {p.name for p in (home / "generate-cache").iterdir()}


def test_the_old_cache_keeps_what_generate_did_not_write_and_says_so(data, home, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(_argv(data, out, n=2)) == 0
    _as_begun_before(out, home, foreign=True)
    capsys.readouterr()
    assert main(_argv(data, out, n=2)) == 0
    err = capsys.readouterr().err
    assert (out / ".cache" / "notes.txt").read_text() == "the user's own\n"
    assert sorted(p.name for p in (out / ".cache").iterdir()) == ["notes.txt"]
    assert _foreign_arrays(out) == []
    assert str(out / ".cache") in err and "notes.txt" in err, err


def test_a_cache_inside_the_output_is_refused_in_one_line(data, home, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(data, out, "--cache", str(out / "cache"), n=1)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--cache" in err and str(out / "cache") in err, err
    assert not out.exists()


def test_a_given_cache_is_used_and_the_users_is_not(data, home, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(_argv(data, out, "--cache", str(cache), n=1)) == 0
    assert any(p.name.startswith("case-") for p in cache.iterdir())
    assert not (home / "generate-cache").exists()
    assert _foreign_arrays(out) == []
