"""``medsynth review --summarise``: what summary.md says where there is nothing, or next to nothing, to say."""

from __future__ import annotations

import re

from MedSynthLib.evaluation.reader_study import summarise, summary_text


def _answers(correct: int, total: int) -> list[dict]:
    """``total`` answers on T1 items (truth alternating real / synthetic, confidence 2), the first ``correct`` right."""
    rows = []
    for i in range(total):
        truth = "synthetic" if i % 2 else "real"
        answer = truth if i < correct else ("real" if truth == "synthetic" else "synthetic")
        rows.append({"item_id": f"i{i}", "modality": "t1", "answer": answer, "confidence": 2, "truth": truth,
                     "correct": answer == truth})
    return rows


def _table(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^\| (.+?) \| (.*) \|$", text, re.MULTILINE) if m[1] != "measure"}


def test_a_study_with_no_answers_says_so_in_every_field():
    # summary.md showed "| p against chance (50 %), exact binomial | None |": Python's None, not words.
    text = summary_text(summarise([], 24))
    assert "None" not in text and "nan" not in text.lower(), text
    table = _table(text)
    assert set(table) >= {"accuracy", "p against chance (50 %), exact binomial",
                          "sensitivity (synthetic called synthetic)", "specificity (real called real)"}, table
    for measure, value in table.items():
        assert value == "n/a (no answers yet)", (measure, value)
    assert "Answered 0 of 24 items." in text and "No answers yet." in text


def test_a_summary_of_answers_without_a_plan_names_no_missing_count():
    text = summary_text(summarise(_answers(3, 4)))
    assert "None" not in text and "Answered 4 items." in text, text


def test_a_p_value_below_the_table_precision_is_not_shown_as_zero():
    # 40 of 40 right: p = 1.8e-12, which rounded to 4 decimals read "0.0" (certainty no test gives).
    summary = summarise(_answers(40, 40), 40)
    assert 0 < summary["p_vs_chance"] < 1e-11
    assert _table(summary_text(summary))["p against chance (50 %), exact binomial"] == "1.82e-12"
    assert _table(summary_text(summarise(_answers(7, 8), 8)))["p against chance (50 %), exact binomial"] == "0.0703"
