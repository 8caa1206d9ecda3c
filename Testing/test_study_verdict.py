"""The study's verdict: report.md opens with it and the console's last lines repeat it.

The gate's verdict and the arms that differ from arm 1 came only in the report's Discussion, after every table,
and never on the console, whose per-arm Dice lines made an arm look like the winner.  The report is built from the
shipped cpu study's ``docs/study/report.json``, with the gate and the Holm-corrected p values set for each case.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from MedSynthLib.study import report as study_report
from MedSynthLib.study.statistics import minimum_detectable_difference

BASE = json.loads((REPO / "docs" / "study" / "report.json").read_text())


def _report(gate_passed: bool, significant_arm: str | None) -> dict:
    report = copy.deepcopy(BASE)
    seg = report["segmentation"]
    for arm in seg["paired_vs_real"].values():
        for entry in arm.values():
            entry["dice"]["p_holm"] = 0.5
    if gate_passed:
        seg["gate"].update(passed=True, mean_difference=0.1, wins=20, losses=7, p=0.001)
    else:
        seg["gate"].update(passed=False, mean_difference=-0.02, wins=10, losses=17, p=0.4)
    if significant_arm is not None:
        seg["paired_vs_real"][significant_arm]["WT"]["dice"].update(p_holm=0.01, mean_difference=0.08)
    return report


def _detectable(report: dict) -> float:
    seg = report["segmentation"]
    sds = [arm["WT"]["dice"]["sd_difference"] for arm in seg["paired_vs_real"].values()]
    return minimum_detectable_difference(float(np.median(sds)), len(seg["cases"]))


def _head(report: dict, lines: int = 14) -> str:
    text = study_report.render_markdown(report, {})
    head = "\n".join(text.splitlines()[:lines])
    assert "## Verdict" in head and text.index("## Verdict") < text.index("## Setup"), head
    return head


def test_report_opens_with_a_failed_gate_and_no_arm_that_differs() -> None:
    report = _report(gate_passed=False, significant_arm=None)
    head = _head(report)
    assert "Segmenter gate: FAILED" in head
    assert "no arm differs from real-only after holm correction" in head.lower()
    assert "0 of 21" in head
    assert f"{_detectable(report):.3f}" in head


def test_report_opens_with_a_passed_gate_and_the_arm_that_differs() -> None:
    report = _report(gate_passed=True, significant_arm="real+synthetic")
    head = _head(report)
    assert "Segmenter gate: passed" in head and "FAILED" not in head
    assert study_report.TITLES["real+synthetic"] in head and "WT +0.080" in head
    assert "1 of 21" in head
    assert f"{_detectable(report):.3f}" in head


@pytest.mark.parametrize("gate_passed, arm", [(False, None), (True, "real+synthetic")])
def test_console_ends_with_the_verdict(gate_passed, arm, tmp_path: Path, monkeypatch, capsys) -> None:
    import MedSynthLib.study.run as study_run
    from MedSynthLib.cli import main

    report = _report(gate_passed, arm)
    monkeypatch.setattr(study_run, "run_study", lambda *a, **k: report)
    (tmp_path / "cases").mkdir()
    assert main(["study", "--data", str(tmp_path / "cases"), "-o", str(tmp_path / "out"), "--config", "micro",
                 "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    written = next(i for i, line in enumerate(lines) if "report.json, report.md" in line)
    tail = lines[written + 1:]
    assert 2 <= len(tail) <= 3, tail
    text = "\n".join(tail)
    if gate_passed:
        assert "Segmenter gate: passed" in text
        assert study_report.TITLES["real+synthetic"] in text and "WT +0.080" in text
    else:
        assert "Segmenter gate: FAILED" in text
        assert "no arm differs from real-only" in text.lower()
    assert f"{_detectable(report):.3f}" in text
