"""The statistics and tables of the ``medsynth study`` report, on hand-computed examples.

No study is run here: the functions of ``MedSynthLib.study.statistics`` and the table and
discussion builders of ``MedSynthLib.study.report`` are fed small made-up numbers whose
expected results were worked out by hand (or by brute-force enumeration).
"""

from __future__ import annotations

import numpy as np
import pytest

from MedSynthLib.study import report as study_report
from MedSynthLib.study.statistics import holm, minimum_detectable_difference, paired_comparison, sign_flip_test


def _all_sign_sums(d: np.ndarray) -> np.ndarray:
    """Every one of the 2^n signed sums, built one difference at a time (brute force)."""
    sums = np.zeros(1)
    for value in d:
        sums = np.concatenate([sums + value, sums - value])
    return sums


# --- sign-flip test ------------------------------------------------------------------------------


def test_sign_flip_by_hand() -> None:
    # +-1 +-2 +-3: sums 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 in 2 of 8.
    assert sign_flip_test([1.0, 2.0, 3.0])["p"] == pytest.approx(0.25)
    # 1, -1, 2 (sum 2): |sum| >= 2 in 6 of 8.
    assert sign_flip_test([1.0, -1.0, 2.0])["p"] == pytest.approx(0.75)
    # A zero difference changes no sum's size: the same p as without it.
    assert sign_flip_test([0.0, 1.0, 2.0, 3.0])["p"] == pytest.approx(0.25)
    # Mirrored differences: the observed mean is 0, so every pattern is as extreme.
    assert sign_flip_test([0.2, -0.2])["p"] == pytest.approx(1.0)


def test_sign_flip_is_exact_at_the_studys_n() -> None:
    """n = 27 held-out cases (the cpu study): every sign pattern counted, not a Monte Carlo sample."""
    d = np.random.default_rng(5).normal(0.01, 0.05, 22).round(3)
    sums = _all_sign_sums(d)
    observed = abs(d.sum())
    expected = float(np.mean(np.abs(sums) >= observed - 1e-9))
    result = sign_flip_test(d)
    assert result["exact"] is True
    assert result["p"] == pytest.approx(expected, abs=1e-12)
    result27 = sign_flip_test(np.random.default_rng(6).normal(0.02, 0.05, 27))
    assert result27["exact"] is True and result27["n"] == 27
    # Two equal halves of 13 and 14 differences tie exactly: no floating error may drop a tied pattern.
    tied = np.array([0.1] * 13 + [-0.1] * 13 + [0.3])
    sums = _all_sign_sums(tied)
    assert sign_flip_test(tied)["p"] == pytest.approx(float(np.mean(np.abs(sums) >= 0.3 - 1e-9)), abs=1e-12)


def test_sign_flip_monte_carlo_memory_does_not_grow_with_the_resamples() -> None:
    """Beyond EXACT_MAX_N (a larger study, e.g. the paper config on many cases) the 2^20 resamples are drawn in
    batches: all at once they took 2^20 x n doubles (1.6 GB at n = 200)."""
    import tracemalloc

    d = np.random.default_rng(4).normal(0.01, 0.05, 200)
    tracemalloc.start()
    try:
        result = sign_flip_test(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result["exact"] and 0.0 < result["p"] < 1.0
    assert peak < 200 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB"


def test_sign_flip_is_two_sided_and_symmetric() -> None:
    d = np.array([0.05, 0.02, 0.07, -0.01, 0.03, 0.04])
    assert sign_flip_test(d)["p"] == pytest.approx(sign_flip_test(-d)["p"])
    # All 6 positive is the most extreme pattern of this set: 2 of 64 (both signs).
    assert sign_flip_test(np.abs(d) + 0.01)["p"] == pytest.approx(2 / 64)


# --- Holm ----------------------------------------------------------------------------------------


def test_holm_known_example() -> None:
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Ties keep their order and their adjusted values are equal.
    assert holm([0.02, 0.02, 0.5]) == pytest.approx([0.06, 0.06, 0.5])
    assert holm([]) == []


# --- the minimum detectable difference -----------------------------------------------------------


def test_minimum_detectable_difference_values() -> None:
    # Noncentral t, 26 degrees of freedom: 0.0280 at alpha 0.05, 0.0410 at alpha 0.05 / 21 (Holm's first step).
    assert minimum_detectable_difference(0.05, 27) == pytest.approx(0.0280, abs=5e-4)
    assert minimum_detectable_difference(0.05, 27, alpha=0.05 / 21) == pytest.approx(0.0410, abs=5e-4)
    # Normal approximation (z_0.975 + z_0.8) * SD / sqrt(n) = 2.80 * 0.05 / sqrt(27) = 0.0270, a bit below t.
    assert 0.0270 < minimum_detectable_difference(0.05, 27) < 0.0295
    # It scales with the SD, down to differences that are equal but for floating-point rounding (SD ~ 1e-17).
    assert minimum_detectable_difference(1e-17, 9) == pytest.approx(minimum_detectable_difference(0.05, 9) * 2e-16)
    assert minimum_detectable_difference(0.0, 9) is None


def test_minimum_detectable_difference_for_very_few_cases_at_holm_alpha() -> None:
    """Two held-out cases at alpha 0.05 / 21 (1 degree of freedom): the 80 % power point lies far out, not an error."""
    from scipy.stats import nct, t

    for n, alpha in ((2, 0.05 / 21), (2, 0.05 / 3), (3, 0.0005)):
        mdd = minimum_detectable_difference(0.05, n, alpha=alpha)
        df, critical = n - 1, t.ppf(1 - alpha / 2, n - 1)
        nc = mdd / 0.05 * np.sqrt(n)
        assert nct.sf(critical, df, nc) + nct.cdf(-critical, df, nc) == pytest.approx(0.8, abs=1e-6)
    # The discussion of a two-case report (a fixed split, or a partial report with one fold) states both values.
    report = _mini_report([0.8, 0.6], [0.7, 0.65], [5.0, 6.0], [7.0, 5.0])
    sd = float(np.std(np.array([0.8, 0.6]) - np.array([0.7, 0.65]), ddof=1))
    text = study_report.discussion(report)
    assert f"{minimum_detectable_difference(sd, 2, alpha=0.05 / 21):.3f} at alpha 0.05 / 21" in text


# --- report tables and text ----------------------------------------------------------------------


def _comparison(a: list[float], b: list[float]) -> dict:
    return paired_comparison(a, b, resamples=200)


def _mini_report(arm_dice: list[float], real_dice: list[float], arm_hd: list[float], real_hd: list[float]) -> dict:
    """A report dictionary holding only what the paired tables and the discussion read."""
    from MedSynthLib.study.segmenter import ARMS, REGIONS
    from MedSynthLib.study.statistics import holm_family

    paired = {arm: {r: {"dice": _comparison(arm_dice, real_dice), "hd95": _comparison(arm_hd, real_hd)}
                    for r in REGIONS} for arm in ARMS[1:]}
    holm_family({f"{a}/{r}": paired[a][r]["dice"] for a in ARMS[1:] for r in REGIONS})
    holm_family({f"{a}/{r}": paired[a][r]["hd95"] for a in ARMS[1:] for r in REGIONS})
    n = len(arm_dice)
    summary = {a: {r: {"dice": {"mean": 0.8, "std": 0.1}, "hd95_mm": {"mean": 5.0, "std": 1.0}} for r in REGIONS}
               for a in study_report.ALL_ARMS}
    gate = dict(_comparison(real_dice, [0.5] * n), baseline="baseline:threshold", passed=True)
    spread = {a: {"wt_dice_per_seed": [0.8, 0.81, 0.79], "sd": 0.01, "range": 0.02} for a in ARMS}
    return {"segmentation": {"cases": [f"c{i}" for i in range(n)], "paired_vs_real": paired, "summary": summary,
                             "gate": gate, "seed_spread": spread},
            "design": {"arms": {a: study_report.TITLES[a] for a in study_report.ALL_ARMS}}, "config": {"ci": 0.95}}


def test_hd95_table_counts_better_cases_as_up() -> None:
    """HD95: lower is better, so an arm with a lower HD95 on every case is better on every case (↑)."""
    real_hd = [10.0, 12.0, 8.0, 9.0]
    arm_hd = [5.0, 6.0, 4.0, 4.5]  # better on all 4
    report = _mini_report([0.8, 0.7, 0.9, 0.6], [0.7, 0.6, 0.8, 0.5], arm_hd, real_hd)
    hd_row = study_report.paired_table(report, "hd95").splitlines()[2]
    assert "4↑ 0↓" in hd_row, hd_row
    dice_row = study_report.paired_table(report, "dice").splitlines()[2]
    assert "4↑ 0↓" in dice_row, dice_row


def test_hd95_p_values_are_holm_corrected_as_a_family() -> None:
    report = _mini_report([0.8, 0.7, 0.9, 0.6], [0.7, 0.6, 0.8, 0.5], [5.0, 6.0, 4.0, 4.5], [10.0, 12.0, 8.0, 9.0])
    assert "Holm p" in study_report.paired_table(report, "hd95")


def test_report_calls_p_values_exact_only_when_they_are() -> None:
    from MedSynthLib.study.segmenter import ARMS, REGIONS

    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 0.9, 27).tolist(), rng.uniform(0.5, 0.9, 27).tolist()
    report = _mini_report(a, b, a, b)
    exact = all(report["segmentation"]["paired_vs_real"][arm][r]["dice"]["p_exact"] for arm in ARMS[1:] for r in REGIONS)
    text = study_report.paired_legend(report)
    assert ("exact sign-flip" in text) == exact
    for arm in ARMS[1:]:
        for r in REGIONS:
            report["segmentation"]["paired_vs_real"][arm][r]["dice"]["p_exact"] = False
    text = study_report.paired_legend(report)
    assert "exact sign-flip" not in text and "Monte Carlo" in text


def test_discussion_states_the_detectable_difference_with_and_without_holm() -> None:
    rng = np.random.default_rng(1)
    real = rng.uniform(0.6, 0.9, 27)
    arm = real + rng.normal(0.0, 0.05, 27)
    report = _mini_report(arm.tolist(), real.tolist(), (20 - 10 * arm).tolist(), (20 - 10 * real).tolist())
    text = study_report.discussion(report)
    sd = float(np.std(arm - real, ddof=1))
    m = len(study_report.ARMS[1:]) * 3
    assert f"{minimum_detectable_difference(sd, 27):.3f}" in text
    assert f"{minimum_detectable_difference(sd, 27, alpha=0.05 / m):.3f}" in text


def test_gate_verdict_needs_more_than_a_rounding_difference() -> None:
    """A real-only arm 0.0002 Dice above the threshold with p = 1 has not been shown to beat it."""
    rng = np.random.default_rng(2)
    base = rng.uniform(0.5, 0.9, 9)
    real = base + np.array([0.05, -0.05, 0.04, -0.04, 0.03, -0.03, 0.02, -0.02, 0.0018])
    report = _mini_report(real.tolist(), base.tolist(), real.tolist(), base.tolist())
    gate = dict(paired_comparison(real.tolist(), base.tolist(), resamples=200), baseline="baseline:threshold")
    gate["passed"] = bool(gate["mean_difference"] > 0 and gate["wins"] > gate["losses"])
    report["segmentation"]["gate"] = gate
    assert gate["passed"] and gate["p"] > 0.5
    text = study_report.discussion(report)
    assert "**Segmenter gate: passed.**" not in text
    assert "not shown" in text and "+0.0002" in text


# --- a partial report from cached stages ---------------------------------------------------------


def test_partial_assembly_finds_stages_by_content(tmp_path) -> None:
    """Fold 1 complete but for one seed of one arm, fold 2 without its stages: what is in and what is missing."""
    import json
    from types import SimpleNamespace

    from MedSynthLib.study.preview import assemble
    from MedSynthLib.study.segmenter import ARMS

    ids = ["a", "b", "c", "d"]
    folds = [SimpleNamespace(index=1, test=["a", "b"], train=["c", "d"]),
             SimpleNamespace(index=2, test=["c", "d"], train=["a", "b"])]
    score = {"WT": {"dice": 0.5, "hd95": 3.0}, "TC": {"dice": 0.4, "hd95": None}, "ET": {"dice": 1.0, "hd95": 0.0}}

    def write(rel: str, data: dict) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    write("baseline/x.json", {"variants": {"threshold": {"scores": {"a": score, "b": score}}}, "seconds": 1})
    write("fidelity/y.json", {"cases": {"a": {}, "b": {}}, "train_cases": {}, "seconds": 2})
    write("memorisation/z.json", {"cases": [{"ncc_all": {"c": 0.1, "d": 0.2}}], "seconds": 3})
    write("synthetic/k1/index.json", {"key": "k1", "cases": [{"base": "c", "model_sha256": "m"},
                                                             {"base": "template", "model_sha256": "m"}]})

    def seeds_of(fold, arm):
        return [100 * fold.index + k for k in range(3)]

    for n, arm in enumerate(ARMS):
        for k in range(3):
            if arm == "real@50" and k == 2:
                continue  # one seed of one arm still running
            write(f"arms/{n}_{k}.json", {"arm": arm, "seed": 100 + k, "scores": {"a": score, "b": score}})
    import MedSynthLib.study.preview as preview

    # No GAN model folder here: stand one in for the model-sha256 lookup.
    results, partial = assemble(tmp_path, folds, seeds_of, ids)
    assert results["folds"] == []  # no GAN found: fold 1 is not complete
    assert partial["folds"][0]["stages"] == {"gan": False, "synthetic": True, "fidelity": True,
                                             "memorisation": True, "baseline": True}
    original = preview.collect_fold

    def with_gan(*a, **k):
        found = original(*a, **k)
        if found["stages"]["synthetic"] is not None:
            found["stages"]["gan"] = {"train_seconds": 1.0}
        return found

    preview.collect_fold = with_gan
    try:
        results, partial = assemble(tmp_path, folds, seeds_of, ids)
    finally:
        preview.collect_fold = original
    assert [f["fold"] for f in results["folds"]] == [1]
    assert set(results["folds"][0]["arms"]) == set(ARMS) - {"real@50"}
    assert partial["arms_included"] == [a for a in ARMS if a != "real@50"]
    assert partial["folds"][0]["arms_seeds_done"]["real@50"] == 2
    assert partial["folds"][1] == {"fold": 2, "included": False,
                                   "stages": dict.fromkeys(("gan", "synthetic", "fidelity", "memorisation",
                                                            "baseline"), False),
                                   "arms_seeds_done": dict.fromkeys(ARMS, 0)}
    runs = results["folds"][0]["arms"]["real"]["runs"]
    assert [r["seed"] for r in runs] == [100, 101, 102]
    assert "PARTIAL REPORT" in __import__("MedSynthLib.study.report", fromlist=["x"]).partial_note(partial)
    assert partial["complete"] is False

    # The last seed finishes; with fold 1 the only fold, the study is complete.
    write("arms/real50_2.json", {"arm": "real@50", "seed": 102, "scores": {"a": score, "b": score}})
    preview.collect_fold = with_gan
    try:
        results, partial = assemble(tmp_path, folds[:1], seeds_of, ids)
    finally:
        preview.collect_fold = original
    assert partial["complete"] is True and set(results["folds"][0]["arms"]) == set(ARMS)


def test_image_reidentification_counts_the_source_patient_as_found_only_when_nearest() -> None:
    from scipy.stats import binomtest

    from MedSynthLib.study.report import image_reidentification, reidentification_table

    def entry(kind: str, base: str, scores: dict[str, float]) -> dict:
        return {"kind": kind, "base": base, "ncc_all": scores}

    entries = [entry("transform", "a", {"a": 0.5, "b": 0.2, "c": 0.1, "d": 0.3}),  # found (rank 1)
               entry("transform", "b", {"a": 0.1, "b": 0.4, "c": 0.2, "d": 0.0}),  # found (rank 1)
               entry("insert", "c", {"a": 0.3, "b": 0.2, "c": 0.25, "d": 0.1}),    # rank 2: not found
               entry("template", "ICBM152", {"a": 0.2, "b": 0.1, "c": 0.0, "d": 0.3})]
    result = image_reidentification(entries)["by_kind"]
    assert result["transform"] == {"n": 2, "source_patient": True, "top1": 2, "top1_accuracy": 1.0, "chance": 0.25,
                                   "median_rank": 1.0,
                                   "p_above_chance": binomtest(2, 2, 0.25, alternative="greater").pvalue}
    assert result["transform"]["p_above_chance"] == 0.0625
    assert result["insert"]["top1"] == 0 and result["insert"]["median_rank"] == 2.0
    assert result["insert"]["p_above_chance"] == 1.0
    assert result["template"] == {"n": 1, "source_patient": False}
    table = reidentification_table({"memorisation": {"reidentification_by_image": {"by_kind": result}}})
    assert "| 'transform' | 2 | the patient whose brain it was built on | 2 | 1.00 | 0.250 | 1.0 | 0.062 |" in table
    assert "| 'template' | 1 | none (not a patient's brain) |" in table


@pytest.mark.parametrize("partial, line", [({"complete": False}, "partial report written to OUT"),
                                           (None, "report written to OUT")])
def test_preview_says_whether_the_report_is_partial(monkeypatch, capsys, partial, line) -> None:
    import MedSynthLib.study.preview as preview

    monkeypatch.setattr(preview, "preview", lambda *a, **k: {"partial": partial})
    monkeypatch.setattr("MedSynthLib.study.config.load_config", lambda name: name)
    assert preview.main(["--data", "D", "--work", "W", "-o", "OUT", "--config", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == line
