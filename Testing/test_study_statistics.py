"""The statistics and tables of the ``medsynth study`` report, on hand-computed examples.

No study is run here: the functions of ``MedSynthLib.study.statistics`` and the table and
discussion builders of ``MedSynthLib.study.report`` are fed small made-up numbers whose
expected results were worked out by hand (or by brute-force enumeration).
"""

from __future__ import annotations

import numpy as np
import pytest

from MedSynthLib.study.statistics import holm, minimum_detectable_difference, sign_flip_test


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
