"""`medsynth evaluate` end to end: what it says before the long work, how often it reads each case, and the
progress it shows while a case is scored (minutes per BraTS case on 2 cores)."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import write_phantom_case


def _model_trained_on(folder: Path, cases: list[Path]) -> Path:
    """A tiny random-weights generator whose training record lists ``cases`` (by the content hash training keeps)."""
    import torch

    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator
    from MedSynthLib.training.data import case_key
    from test_synthesis_seed import PLAIN

    torch.manual_seed(3)
    state = {k: v.detach().contiguous() for k, v in Generator(PLAIN, backend="torch").state_dict().items()}
    config = {"name": "tiny", "network": PLAIN.to_json(),
              "intensity": {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER},
              "training": {"data": {"cases": len(cases), "case_sha256": [case_key(c) for c in cases]}}}
    return write_model(folder, state, config)


@pytest.fixture()
def two_cases(tmp_path: Path) -> tuple[Path, Path]:
    return write_phantom_case(tmp_path / "cases", 0), write_phantom_case(tmp_path / "cases", 1)


def _record_syntheses(monkeypatch, events: list) -> None:
    """Each synthesis appends "synthesis" to ``events`` (and still runs)."""
    from MedSynthLib.synthesis.synthesize import SynthesisEngine

    synthesize = SynthesisEngine.synthesize

    def recording_synthesize(self, *args, **kwargs):
        events.append("synthesis")
        return synthesize(self, *args, **kwargs)

    monkeypatch.setattr(SynthesisEngine, "synthesize", recording_synthesize)


def test_the_in_sample_notice_comes_before_the_first_synthesis(tmp_path: Path, two_cases, monkeypatch,
                                                               capsys) -> None:
    """Scoring a case the model trained on takes minutes and scores it in-sample: the user learns that first, in one
    stderr line naming the case, before anything is synthesised; the report still marks the case."""
    import json

    from MedSynthLib import cli

    held_out, reference = two_cases
    model = _model_trained_on(tmp_path / "tiny", [held_out])
    events: list[str] = []
    notice = cli._notice

    def recording_notice(message: str) -> None:
        events.append(f"notice: {message}")
        notice(message)

    monkeypatch.setattr(cli, "_notice", recording_notice)
    _record_syntheses(monkeypatch, events)
    report = tmp_path / "report.json"
    assert cli.main(["evaluate", str(held_out), "--reference", str(reference), "--model", str(model),
                     "--device", "cpu", "-o", str(report)]) == 0
    first_synthesis = events.index("synthesis")
    said = [e for e in events[:first_synthesis] if "in-sample" in e]
    assert len(said) == 1 and held_out.name in said[0] and reference.name not in said[0], events
    err = [line for line in capsys.readouterr().err.splitlines() if "in-sample" in line]
    assert len(err) == 1 and err[0].startswith("medsynth: 1 of 1 cases were among tiny's training cases")
    assert json.loads(report.read_text())["training_cases_scored"] == [held_out.name]


def test_each_case_is_read_at_most_twice(tmp_path: Path, two_cases, monkeypatch) -> None:
    """evaluate read every case three times (its content hash, the scoring, its label map's derivation): about 1.3 s
    each for a BraTS case.  Once to tell it (hash, in-sample) before the run and once to score it is enough."""
    import MedSynthLib.cases.readers as readers
    import MedSynthLib.evaluation.evaluate as evaluation
    from MedSynthLib import cli

    held_out, reference = two_cases
    model = _model_trained_on(tmp_path / "tiny", [])
    reads: Counter[str] = Counter()
    read_case = readers.read_case

    def counting(folder, *args, **kwargs):
        reads[Path(folder).name] += 1
        return read_case(folder, *args, **kwargs)

    monkeypatch.setattr(readers, "read_case", counting)
    monkeypatch.setattr(evaluation, "read_case", counting)
    assert cli.main(["evaluate", str(held_out), "--reference", str(reference), "--model", str(model),
                     "--device", "cpu", "-o", str(tmp_path / "report.json")]) == 0
    assert set(reads) == {held_out.name, reference.name}
    assert max(reads.values()) <= 2, reads


def test_the_progress_bar_moves_while_one_case_is_scored(tmp_path: Path, two_cases, monkeypatch) -> None:
    """The bar counted cases only, so a one-case run sat at 0/1 for its minutes (reading, synthesis and each score).
    It now steps through the parts of the work, reaches its total, and moves before the synthesis starts."""
    from MedSynthLib import cli

    held_out, reference = two_cases
    model = _model_trained_on(tmp_path / "tiny", [])
    bars: list[dict] = []
    events: list[str] = []

    @contextmanager
    def recording_progress(total: int, desc: str):
        bar = {"total": total, "desc": desc, "steps": []}
        bars.append(bar)

        def step(label: str) -> None:
            bar["steps"].append(label)
            events.append("step")
        yield step

    monkeypatch.setattr(cli, "_progress", recording_progress)
    _record_syntheses(monkeypatch, events)
    assert cli.main(["evaluate", str(held_out), "--reference", str(reference), "--model", str(model),
                     "--device", "cpu", "-o", str(tmp_path / "report.json")]) == 0
    assert len(bars) == 1
    bar = bars[0]
    assert bar["total"] >= 5 and len(bar["steps"]) == bar["total"], bar
    assert events.index("step") < events.index("synthesis")
    assert any(held_out.name in label for label in bar["steps"]) and any(reference.name in label
                                                                         for label in bar["steps"])


@pytest.mark.parametrize("references", [0, 1])
def test_evaluation_steps_counts_every_step_also_when_the_baselines_are_shared(tmp_path: Path,
                                                                              references: int) -> None:
    """The bar's total is :func:`evaluation_steps`: a second model scored with the first one's baselines (shared)
    skips their work but steps through it, so its bar also ends at its total."""
    from MedSynthLib.evaluation.evaluate import evaluate, evaluation_steps
    from test_evaluate import _Engine, _scorer

    folders = [write_phantom_case(tmp_path, seed) for seed in range(1 + references)]
    shared: dict = {}
    for engine in (_Engine(0.0), _Engine(150.0)):
        steps: list[str] = []
        evaluate(engine, folders[:1], _scorer(engine), reference_dirs=folders[1:] or None, shared=shared,
                 step=steps.append)
        assert len(steps) == evaluation_steps(1, references), steps
    assert steps[-1] == f"{folders[0].name}: checks" and any("(shared)" in s for s in steps)
