"""Two cache versions in one ``medsynth study`` work folder: which results a reader takes, and which a run removes.

A finished micro study whose synthetic stage another version of the draw code made (another cache key), then
the current study in the same work folder: it makes the synthetic cases again, they differ, so the four arms
that train on them are trained again under new keys, while the older synthetic cases, their arms and their
memorisation check stay beside them.  Before, the partial report (``MedSynthLib.study.preview``) picked
whichever synthetic index and arm results sorted last, mixing the two versions, and nothing ever removed the
older version's files.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from MedSynthLib.cli import main
from test_study import older_code, study_args, write_cases

SYNTHETIC_ARMS = ("real+synthetic", "synthetic", "synthetic+finetune", "real+classmean")
# Another process holding the work folder as every study process does (a preview, a records save, a study).
HOLD = ("import sys\nfrom pathlib import Path\nfrom MedSynthLib.study.cache import WorkLock\n"
        "with WorkLock(Path(sys.argv[1])):\n    print('held', flush=True)\n    sys.stdin.read()\n")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cache_versions")
    data = write_cases(root / "cases")
    work = root / "work"
    with older_code():  # the key an older version of the draw code gave the synthetic stage
        assert main(study_args(data, root / "older", "--work", str(work))) == 0
    older_synthetic = sorted(p.name for p in (work / "synthetic").iterdir())
    older_arms = {p.name: json.loads(p.read_text()) for p in (work / "arms").glob("*.json")}
    older_memorisation = sorted(p.name for p in (work / "memorisation").glob("*.json"))
    for images in (work / "synthetic").glob("*/synthetic_0000_images.npy"):
        np.save(images, np.load(images) + np.float16(0.5))  # another synthesis code would have painted otherwise

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held", "the other process could not hold the work folder"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(study_args(data, root / "current", "--work", str(work))) == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    current = json.loads((root / "current" / "report.json").read_text())
    superseded_arms = sorted(name for name, d in older_arms.items() if d["arm"] in SYNTHETIC_ARMS)
    assert len(superseded_arms) == 2 * 4 * 2  # 2 folds x 4 arms on synthetic cases x 2 seeds
    assert all(name in _files(work / "arms") for name in superseded_arms)
    return {"data": data, "work": work, "current": current, "err": err.getvalue(),
            "older_synthetic": older_synthetic, "superseded_arms": superseded_arms,
            "older_memorisation": older_memorisation}


def _copy(two_versions: dict, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(two_versions["work"], work, symlinks=True)
    return work


def _preview(two_versions: dict, work: Path, out: Path, capsys) -> tuple[int, str]:
    from MedSynthLib.study.preview import main as preview_main

    capsys.readouterr()
    rc = preview_main(["--data", str(two_versions["data"]), "--work", str(work), "-o", str(out), "--config", "micro"])
    return rc, capsys.readouterr().err


def _ignored(err: str) -> dict[str, set[str]]:
    """The files each 'ignored' notice of a preview names, by its reason."""
    found: dict[str, set[str]] = {}
    for line in err.splitlines():
        match = re.match(r"preview: fold \d+: ignored \d+ cached result\(s\) (.+?): (\S.*)$", line)
        if match:
            found.setdefault(match.group(1), set()).update(match.group(2).split(", "))
    return found


def test_a_study_keeps_the_superseded_files_while_another_process_holds_the_work_folder(two_versions) -> None:
    lines = [line for line in two_versions["err"].splitlines() if "older cache versions" in line]
    assert len(lines) == 1, two_versions["err"]
    assert lines[0].startswith("medsynth study: kept 20 cached result(s) of older cache versions"), lines[0]
    assert "synthetic: 2" in lines[0] and "arms: 16" in lines[0] and "memorisation: 2" in lines[0]
    assert "holds the work folder" in lines[0]
    work = two_versions["work"]
    assert set(two_versions["older_synthetic"]) < {p.name for p in (work / "synthetic").iterdir()}


def test_preview_reads_only_the_current_cache_version(two_versions, tmp_path, capsys) -> None:
    work = _copy(two_versions, tmp_path)
    rc, err = _preview(two_versions, work, tmp_path / "report", capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    current = two_versions["current"]
    assert report["partial"] is None
    assert [f["cache_key"] for f in report["synthetic_cases"]] == [f["cache_key"] for f in current["synthetic_cases"]]
    for key in ("segmentation", "memorisation", "fidelity"):
        assert report[key] == current[key], key
    ignored = _ignored(err)
    other_synthetic = next(v for k, v in ignored.items() if k.startswith("of other synthetic cases"))
    assert other_synthetic == {f"arms/{name}" for name in two_versions["superseded_arms"]} | {
        f"memorisation/{name}" for name in two_versions["older_memorisation"]}
    older = next(v for k, v in ignored.items() if k.startswith("of an older cache version"))
    assert older == {f"synthetic/{key}/index.json" for key in two_versions["older_synthetic"]}


def test_preview_refuses_results_of_two_versions_that_do_not_say_which_they_are(two_versions, tmp_path, capsys):
    """Written before results recorded their cache version: two synthetic indexes of one fold, and nothing
    says which the arms were trained on, so neither fold is reported (before, one of each was taken)."""
    work = _copy(two_versions, tmp_path)
    for path in [*work.glob("*/*.json"), *work.glob("synthetic/*/index.json")]:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "cache" in data:
            del data["cache"]
            path.write_text(json.dumps(data))
    rc, err = _preview(two_versions, work, tmp_path / "report", capsys)
    assert rc == 2, err
    assert "no fold has its GAN, synthetic cases" in err
    synthetic = [line for line in err.splitlines() if "cannot be told" in line and "synthetic/" in line]
    assert len(synthetic) == 2, err  # one line per fold
    assert not (tmp_path / "report").exists()


def test_a_finished_run_removes_the_results_it_superseded(two_versions, tmp_path, capsys) -> None:
    work = _copy(two_versions, tmp_path)
    (work / "synthetic" / "notes.txt").write_text("the user's own file")
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (work / "arms" / "0123456789abcdef.json").symlink_to(outside)  # named like a result, but a link out
    before = _files(work)
    capsys.readouterr()
    assert main(study_args(two_versions["data"], tmp_path / "again", "--work", str(work))) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert not any(report["timings"]["stage_computed_this_run"].values())
    assert report["segmentation"] == two_versions["current"]["segmentation"]
    lines = [line for line in err.splitlines() if "older cache versions" in line]
    assert len(lines) == 1 and lines[0].startswith("medsynth study: removed 20 cached result(s)"), err
    removed = before - _files(work)
    assert removed == ({f"arms/{name}" for name in two_versions["superseded_arms"]}
                       | {f"memorisation/{name}" for name in two_versions["older_memorisation"]}
                       | {f for f in before if f.split("/")[:2] in (["synthetic", k] for k in
                                                                   two_versions["older_synthetic"])})
    assert not any(f.startswith(("gan/", "prepared/", "cases/", "arrays/")) for f in removed)
    assert (work / "synthetic" / "notes.txt").exists() and outside.exists()
    assert (work / "arms" / "0123456789abcdef.json").is_symlink()
    for fold in report["synthetic_cases"]:
        assert (work / "synthetic" / fold["cache_key"] / "index.json").exists()

    # One version left: a preview ignores nothing, and a rerun removes nothing and says nothing.
    rc, err = _preview(two_versions, work, tmp_path / "preview", capsys)
    assert rc == 0 and "ignored" not in err, err
    assert main(study_args(two_versions["data"], tmp_path / "third", "--work", str(work))) == 0
    assert "older cache versions" not in capsys.readouterr().err


def test_partial_assembly_takes_one_cache_version(tmp_path) -> None:
    """Hand-written results recording their cache version: the newest synthetic cases of a fold, only arms trained
    on them, and across folds only arms of the code version of the newest arm."""
    from types import SimpleNamespace

    from MedSynthLib.study.preview import _Notices, assemble, collect_fold
    from MedSynthLib.study.segmenter import ARMS

    folds = [SimpleNamespace(index=1, test=["a"], train=["b", "c"]),
             SimpleNamespace(index=2, test=["b"], train=["a", "c"])]
    score = {"WT": {"dice": 0.5, "hd95": 3.0}, "TC": {"dice": 0.4, "hd95": 1.0}, "ET": {"dice": 1.0, "hd95": 0.0}}

    def write(rel: str, data: dict) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(data))

    def cache(code: str, written: float, **inputs) -> dict:
        return {"inputs": inputs, "config": {}, "code": code, "written": written}

    for key, base, written in (("k1", "b", 1.0), ("k2", "b", 2.0), ("k3", "a", 1.0)):
        write(f"synthetic/{key}/index.json", {"key": key, "cases": [{"base": base, "model_sha256": "m"}],
                                              "cache": cache("s", written)})
    for fold, synthetic, code, written in ((folds[0], "k2", "new", 10.0), (folds[1], "k3", "old", 5.0)):
        for n, arm in enumerate(ARMS):
            for k in range(2):
                seed = 100 * fold.index + k
                uses = arm in SYNTHETIC_ARMS
                write(f"arms/{fold.index}_{n}_{k}.json",
                      {"key": f"{fold.index}_{n}_{k}", "arm": arm, "seed": seed, "scores": {fold.test[0]: score},
                       "cache": cache(code, written, synthetic=synthetic if uses else None)})
    # Newer, but trained on the older synthetic cases of fold 1.
    write("arms/stale.json", {"key": "stale", "arm": "synthetic", "seed": 100, "scores": {"a": score},
                              "cache": cache("new", 20.0, synthetic="k1")})

    def seeds_of(fold, arm):
        return [100 * fold.index + k for k in range(2)]

    notices = _Notices(tmp_path)
    fold1 = collect_fold(tmp_path, folds[0], {arm: seeds_of(folds[0], arm) for arm in ARMS}, ["a", "b", "c"],
                         notices=notices)
    assert fold1["stages"]["synthetic"]["key"] == "k2"
    assert fold1["arms"]["synthetic"][0]["key"] == "1_2_0"
    text = "\n".join(notices.text())
    assert "synthetic/k1/index.json" in text and "arms/stale.json" in text
    notices = _Notices(tmp_path)
    _, partial = assemble(tmp_path, folds, seeds_of, ["a", "b", "c"], notices=notices)
    assert partial["folds"][0]["arms_seeds_done"] == dict.fromkeys(ARMS, 2)
    assert partial["folds"][1]["arms_seeds_done"] == dict.fromkeys(ARMS, 0)  # another code version: dropped
    dropped = [line for line in notices.text() if line.startswith("fold 2:") and "another version" in line]
    assert len(dropped) == 1 and dropped[0].count("arms/2_") == 2 * len(ARMS), notices.text()


# --- studies of two configs in one work folder -----------------------------------------------------------------


def _config_args(data: Path, out: Path, work: Path, config: str) -> list[str]:
    return [a if a != "micro" else config for a in study_args(data, out, "--work", str(work))]


@pytest.fixture(scope="module")
def two_configs(tmp_path_factory) -> dict:
    """Config A (micro), then config B (one synthetic case per training case) in one work folder: first B made
    by an older version of the synthetic code, then B by this one, then A again."""
    root = tmp_path_factory.mktemp("two_configs")
    data = write_cases(root / "cases")
    work = root / "work"
    config_b = root / "study_b.json"
    micro = json.loads((Path(__file__).resolve().parents[1] / "Resources/configs/study_micro.json").read_text())
    micro.pop("$comment")
    config_b.write_text(json.dumps(dict(micro, synthetic=dict(micro["synthetic"], per_case=1))))

    assert main(_config_args(data, root / "a", work, "micro")) == 0
    a_files = _files(work)
    shutil.copytree(work, root / "after_a", symlinks=True)
    with older_code():
        assert main(_config_args(data, root / "b_older", work, str(config_b))) == 0
    b_older = _files(work) - a_files
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(_config_args(data, root / "b", work, str(config_b))) == 0
    b_files = _files(work)
    err_again = io.StringIO()
    with contextlib.redirect_stderr(err_again):
        assert main(_config_args(data, root / "a_again", work, "micro")) == 0
    return {"data": data, "work": work, "config_b": config_b, "a_files": a_files, "b_older": b_older,
            "b_files": b_files, "err_b": err.getvalue(), "err_a_again": err_again.getvalue(),
            "after_a": root / "after_a", "report": {name: json.loads((root / name / "report.json").read_text())
                                                     for name in ("a", "b_older", "b", "a_again")}}


def test_a_run_of_other_options_keeps_the_first_configs_results(two_configs) -> None:
    """Before, config B's finish removed config A's synthetic cases, memorisation checks and the 16 arms trained
    on them, so a rerun of A trained them again."""
    assert two_configs["a_files"] <= two_configs["b_files"], sorted(two_configs["a_files"] - two_configs["b_files"])
    again = two_configs["report"]["a_again"]
    assert not any(again["timings"]["stage_computed_this_run"].values()), again["timings"]
    assert again["segmentation"] == two_configs["report"]["a"]["segmentation"]
    assert "older cache versions" not in two_configs["err_a_again"] and "kept" not in two_configs["err_a_again"]
    assert two_configs["b_files"] <= _files(two_configs["work"])  # and A's rerun keeps B's


def test_a_run_removes_the_older_versions_of_its_own_results(two_configs) -> None:
    lines = [line for line in two_configs["err_b"].splitlines() if "older cache versions" in line]
    assert len(lines) == 1, two_configs["err_b"]
    assert lines[0].startswith("medsynth study: removed 20 cached result(s) of older cache versions"), lines[0]
    assert "synthetic: 2" in lines[0] and "arms: 16" in lines[0] and "memorisation: 2" in lines[0], lines[0]
    assert "do not record" not in lines[0]
    older_b = two_configs["report"]["b_older"]
    older_keys = {f["cache_key"] for f in older_b["synthetic_cases"]}
    current_keys = {f["cache_key"] for f in two_configs["report"]["b"]["synthetic_cases"]}
    assert older_keys and not older_keys & current_keys
    removed = two_configs["b_older"] - two_configs["b_files"]
    assert {f.split("/")[1] for f in removed if f.startswith("synthetic/")} == older_keys
    assert sum(f.startswith("arms/") for f in removed) == 16 and sum(f.startswith("memorisation/") for f in removed) == 2
    assert not removed & two_configs["a_files"]


def test_results_that_do_not_record_their_options_are_kept_and_counted(two_configs, tmp_path, capsys) -> None:
    """A work folder of a MedSynth that recorded no options: config B's finish cannot tell A's results from
    older versions of its own, so it keeps them and says how many."""
    work = tmp_path / "work"
    shutil.copytree(two_configs["after_a"], work, symlinks=True)
    for path in [*work.glob("*/*.json"), *work.glob("synthetic/*/index.json")]:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.pop("cache", None) is not None:
            path.write_text(json.dumps(data))
    before = _files(work)
    capsys.readouterr()
    assert main(_config_args(two_configs["data"], tmp_path / "b", work, str(two_configs["config_b"]))) == 0
    err = capsys.readouterr().err
    assert before <= _files(work)
    lines = [line for line in err.splitlines() if "do not record" in line]
    assert len(lines) == 1 and "older cache versions" not in lines[0], err
    # A's synthetic cases and memorisation checks of 2 folds, the 16 arms trained on them (the rest B uses too).
    assert lines[0].startswith("medsynth study: kept 20 cached result(s) that do not record which options made them "
                               "(synthetic: 2, arms: 16, memorisation: 2)"), lines[0]


def test_only_results_of_the_same_options_are_superseded(tmp_path) -> None:
    """Hand-written records: other GAN weights of the same GAN options are an older version; of other GAN options,
    or of a record that names no GAN options, they are not; an arm follows the synthetic cases it trained on."""
    from MedSynthLib.study.cache import superseded

    def write(rel: str, record: dict | None) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps({} if record is None else {"cache": record}))

    def synthetic(model: str, gan: dict | None, code: str = "c") -> dict:
        return {"inputs": {"model": model, "train": ["t"], "fold": 1, "v": 1}, "config": {"per_case": 1},
                "code": code, **({"options": {"gan": gan}} if gan is not None else {})}

    def arm(synthetic_key: str, code: str = "c") -> dict:
        return {"inputs": {"arm": "synthetic", "seed": 1, "fold": 1, "synthetic": synthetic_key, "v": 1},
                "config": {"steps": 4}, "code": code}

    keys = {name: f"{n:016x}" for n, name in enumerate(
        ["used", "same_gan", "other_gan", "no_options", "used_arm", "arm_same", "arm_other", "arm_none", "ckpt"])}
    used = {"synthetic": {keys["used"]: synthetic("m2", {"steps": 4})},
            "arms": {keys["used_arm"]: arm(keys["used"])}}
    write(f"synthetic/{keys['used']}/index.json", used["synthetic"][keys["used"]])
    write(f"synthetic/{keys['same_gan']}/index.json", synthetic("m1", {"steps": 4}, code="older"))
    write(f"synthetic/{keys['other_gan']}/index.json", synthetic("m3", {"steps": 8}))
    write(f"synthetic/{keys['no_options']}/index.json", synthetic("m4", None))
    write(f"arms/{keys['arm_same']}.json", arm(keys["same_gan"]))
    write(f"arms/{keys['arm_other']}.json", arm(keys["other_gan"]))
    write(f"arms/{keys['arm_none']}.json", None)
    (tmp_path / "arms" / f"{keys['ckpt']}.ckpt").mkdir()
    old, unknown = superseded(tmp_path, used)
    assert {(folder, key) for folder, key, _ in old} == {("synthetic", keys["same_gan"]), ("arms", keys["arm_same"])}
    assert {(folder, key) for folder, key, _ in unknown} == {
        ("synthetic", keys["no_options"]), ("arms", keys["arm_none"]), ("arms", keys["ckpt"])}
