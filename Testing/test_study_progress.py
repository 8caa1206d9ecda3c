"""``medsynth study``'s progress: the ETA after each stage, the bars of the long stages, and Ctrl-C in them.

On five real BraTS cases the micro config's preparation took 110 s and the study about 15 min, yet the line after
the preparation said ``ETA 360 min 22 s``: one weight per kind of stage, scaled by the first stage's time, cannot
know that a 4-step arm costs seconds while preparing a real case costs half a minute.  The preparation (1 min 50 s)
and the fidelity stage (1 min 51 s) showed no bar either.

The phantom study here runs the micro config with the stage times of that run put in place of its own (the fake
clock): the ETAs it prints are compared with the time those stages really had left.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from conftest import write_phantom_case
from MedSynthLib.cli import main
from MedSynthLib.study.segmenter import ARMS

CASE_IDS = ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003")
SEEDS = 2  # the micro config's segmenter seeds
STAGE_LINE = re.compile(r"^medsynth study: (?P<name>.+): (?:done|cached) \(.*?\); (?P<done>\d+)/(?P<total>\d+) stages"
                        r"(?:, ETA (?P<eta>.+))?$")


def audited_seconds(name: str) -> float:
    """What each stage of the micro config took on real BraTS cases on 2 cores (the auditor's run)."""
    fold2 = name.startswith("fold 2/")
    for part, seconds in (("GAN", 1.0 if fold2 else 10.0), ("synthetic cases", 4.0),
                          ("fidelity", 74.0 if fold2 else 111.0), ("memorisation", 0.4), ("baseline", 2.0),
                          ("seed 1", 11.0), ("seed 2", 8.0)):
        if part in name:
            return seconds
    assert name == "prepare", name
    return 110.0


def micro_plan() -> list[str]:
    names = ["prepare"]
    for fold in (1, 2):
        tag = f"fold {fold}/2"
        names += [f"{tag} GAN", f"{tag} synthetic cases", f"{tag} fidelity", f"{tag} memorisation check",
                  f"{tag} FLAIR-threshold baseline"]
        names += [f"{tag} arm {arm} seed {k}" for arm in ARMS for k in range(1, SEEDS + 1)]
    return names


def seconds_of(text: str) -> float:
    match = re.fullmatch(r"(?:(\d+) min )?(\d+) s", text)
    assert match, text
    return 60 * int(match.group(1) or 0) + int(match.group(2))


class Terminal(io.StringIO):
    """stderr as on a terminal: tqdm draws its bars only there."""

    def isatty(self) -> bool:
        return True


def study_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["study", "--data", str(data), "-o", str(out), "--config", "micro", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progress_cases") / "cases"
    for seed, case_id in enumerate(CASE_IDS):
        write_phantom_case(root, seed, case_id)
    return root


#: The run below stops after this stage: fold 1's GAN, synthetic cases, fidelity, memorisation check, baseline and
#: first three arms are done, so every kind of stage has been timed once.
STOP_AFTER = "fold 1/2 arm real+synthetic seed 1"


@pytest.fixture(scope="module")
def on_a_terminal(cases, tmp_path_factory) -> dict:
    """A study on a terminal with the audited stage times, cancelled by Ctrl-C after STOP_AFTER."""
    from MedSynthLib.study.run import _Study

    root = tmp_path_factory.mktemp("progress_run")
    stage_done = _Study._stage_done

    def timed_as_audited(self, name, kind, seconds, computed):
        stage_done(self, name, kind, audited_seconds(name), computed)
        if name == STOP_AFTER:
            os.kill(os.getpid(), signal.SIGINT)

    terminal = Terminal()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(terminal):
            patch.setattr(_Study, "_stage_done", timed_as_audited)
            rc = main(study_args(cases, root / "report", "--work", str(root / "work")))
    finally:
        signal.signal(signal.SIGINT, previous)
    return {"rc": rc, "err": terminal.getvalue(), "work": root / "work", "report": root / "report"}


def test_the_eta_is_never_far_above_the_time_left(on_a_terminal) -> None:
    plan = micro_plan()
    assert len(plan) == 43
    seconds = [audited_seconds(name) for name in plan]
    lines = [m for m in map(STAGE_LINE.match, on_a_terminal["err"].replace("\r", "\n").splitlines()) if m]
    assert [m["name"] for m in lines] == [n if "synthetic cases" not in n else n + " (4)" for n in plan[:len(lines)]]
    assert lines[-1]["name"] == STOP_AFTER
    for m in lines:
        done = int(m["done"])
        assert int(m["total"]) == len(plan)
        left = sum(seconds[done:])
        eta = m["eta"]
        if eta is None or eta.startswith("unknown until "):
            continue
        # Within 3x of the truth (the first stage of a kind costs more than the next: warm-up, first allocation).
        assert seconds_of(eta) <= 3 * left, f"after {m['name']}: ETA {eta}, {left:.0f} s really left"
    last = lines[-1]
    assert last["eta"] is not None and not last["eta"].startswith("unknown"), \
        "every kind of stage has been timed: an estimate is due"
    left = sum(seconds[int(last["done"]):])
    assert left / 3 <= seconds_of(last["eta"]) <= 3 * left, (last["eta"], left)
    first = lines[0]
    assert first["eta"] == "unknown until an arm has trained", first.string


def test_preparation_and_fidelity_show_a_bar_on_a_terminal(on_a_terminal) -> None:
    # A bar over the 4 cases (tqdm draws it at its start; how many steps it redraws depends on the stage's speed).
    err = on_a_terminal["err"]
    assert re.search(r"prepare:\s+\d+%\|[^|]*\| [0-4]/4 ", err), err[-3000:]
    assert re.search(r"fold 1/2 fidelity:\s+\d+%\|[^|]*\| [0-4]/4 ", err), err[-3000:]


def test_ctrl_c_names_what_resumes(on_a_terminal) -> None:
    assert on_a_terminal["rc"] == 130
    lines = [line for line in on_a_terminal["err"].replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in on_a_terminal["err"] and "KeyboardInterrupt" not in on_a_terminal["err"]
    assert lines[-1] == "medsynth: cancelled"
    assert f"after 9 of 43 stages; the finished work is kept in {on_a_terminal['work']}" in lines[-2], lines[-2]
    assert "the same command resumes" in lines[-2]
    assert not on_a_terminal["report"].exists()


def _cancelled_quietly(capsys, work: Path) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "%|" not in err, "--quiet draws no bar"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "medsynth: cancelled", err
    assert "interrupted" in lines[-2] and str(work) in lines[-2] and "the same command resumes" in lines[-2], err
    return lines


def test_ctrl_c_while_preparing_the_cases(cases, tmp_path, monkeypatch, capsys, sigint_as_in_a_terminal) -> None:
    import MedSynthLib.study.data as study_data

    write_image = study_data.write_image
    written: list[str] = []

    def cancelled_in_the_second_case(image, path, *args, **kwargs):
        written.append(Path(path).name)
        if len(written) == 7:  # five images per case: the second one of the second case
            os.kill(os.getpid(), signal.SIGINT)
        return write_image(image, path, *args, **kwargs)

    monkeypatch.setattr(study_data, "write_image", cancelled_in_the_second_case)
    work = tmp_path / "work"
    assert main(study_args(cases, tmp_path / "report", "--work", str(work), "--quiet")) == 130
    lines = _cancelled_quietly(capsys, work)
    assert "after 0 of 43 stages" in lines[-2]
    assert len(written) == 7 and not (tmp_path / "report").exists()
    prepared = [p.parent.name for p in work.glob("cases/*/*/study_case.json")]
    assert prepared == [CASE_IDS[0]], "the first case stays prepared"
    assert [p.name for p in work.glob("cases/*/*")] == [CASE_IDS[0]], "the cancelled case left nothing half written"


def test_ctrl_c_while_measuring_fidelity(cases, on_a_terminal, tmp_path, monkeypatch, capsys,
                                         sigint_as_in_a_terminal) -> None:
    import MedSynthLib.evaluation.metrics as metrics

    work = tmp_path / "work"
    shutil.copytree(on_a_terminal["work"], work, symlinks=True)
    shutil.rmtree(work / "fidelity")  # fold 1's GAN and synthetic cases are cached: its fidelity runs next
    fidelity = metrics.fidelity

    def cancelled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return fidelity(*args, **kwargs)

    monkeypatch.setattr(metrics, "fidelity", cancelled)
    assert main(study_args(cases, tmp_path / "report", "--work", str(work), "--quiet")) == 130
    lines = _cancelled_quietly(capsys, work)
    assert "after 3 of 43 stages" in lines[-2]
    assert not list((work / "fidelity").glob("*.json")), "no fidelity result from a cancelled measurement"


def _plan(given_gans: bool) -> tuple[list[str], list[str]]:
    """The micro study's stage kinds (as the study plans them) beside the stage names."""
    from types import SimpleNamespace

    from MedSynthLib.study.config import load_config
    from MedSynthLib.study.run import Fold, _Study

    folds = [Fold(1, ["a"], ["b"]), Fold(2, ["b"], ["a"])]
    study = SimpleNamespace(inputs=SimpleNamespace(folds=folds, gan_models={1: None, 2: None} if given_gans else {}),
                            config=load_config("micro"))
    kinds = _Study.stage_plan(study)  # type: ignore[arg-type]
    assert len(kinds) == len(micro_plan())
    return kinds, micro_plan()


def test_given_gans_cost_nothing_and_a_resumed_study_is_estimated_from_its_cache() -> None:
    from MedSynthLib.study.run import _ETA, _Study

    # Given GANs (no training): the estimate comes once an arm has trained, without a GAN ever training.
    kinds, names = _plan(given_gans=True)
    assert kinds[1] == kinds[22] == "given-gan"
    eta = _ETA(_Study.STAGE_KINDS, kinds)
    lines = [eta.finish(kind, 3600.0 if kind == "given-gan" else audited_seconds(name), kind != "given-gan")
             for kind, name in zip(kinds, names)]
    assert lines[5].endswith("ETA unknown until an arm has trained"), lines[5]
    left = sum(audited_seconds(name) for name in names[7:] if "GAN" not in name)
    # fold 2's given GAN adds nothing (the 3600 s its model records were not spent here)
    assert left / 2 < seconds_of(lines[6].split("ETA ")[1]) < 2 * left, lines[6]

    # Resumed in fold 1's arms: the cached stages' recorded times estimate fold 2, from the first computed stage on.
    kinds, names = _plan(given_gans=False)
    eta = _ETA(_Study.STAGE_KINDS, kinds)
    lines = [eta.finish(kind, audited_seconds(name), i >= 8) for i, (kind, name) in enumerate(zip(kinds, names))]
    assert lines[7] == "8/43 stages", "nothing computed yet: the rest may be cached too"
    left = sum(audited_seconds(name) for name in names[9:])
    assert left / 2 < seconds_of(lines[8].split("ETA ")[1]) < 2 * left, lines[8]

    # A finished study rerun: every stage cached, no estimate.
    eta = _ETA(_Study.STAGE_KINDS, kinds)
    assert [eta.finish(kind, 10.0, False) for kind in kinds][-2:] == ["42/43 stages", "43/43 stages"]
