"""Statistics of the study: paired tests, Holm correction, intervals only where n supports them.

Every comparison in the study is paired by held-out case (the same case scored by two
arms).  The test is the sign-flip permutation test of the mean paired difference
exact for up to ``EXACT_MAX_N`` cases: all 2^n sign patterns counted, by meeting in the
middle, two halves of 2^(n/2) signed sums; beyond that a seeded Monte Carlo of 2^20 patterns
with ``scipy.stats.permutation_test``), the p-values of one family
are Holm-corrected, intervals are BCa bootstrap intervals (``scipy.stats.bootstrap``)
and are reported only from ``MIN_N_INTERVAL`` cases on (with fewer, a bootstrap interval
covers far less than its nominal level).  The minimum detectable difference is computed
from the observed spread of the paired differences, never stated in fixed prose.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: BraTS convention: the HD95 of a region predicted empty (or predicted where there is none) is
#: this penalty (the diagonal of the 240 x 240 x 155 mm BraTS volume), not a dropped case.
HD95_PENALTY_MM = 373.13
#: Up to this many paired cases the sign-flip test counts every sign pattern (exact).
EXACT_MAX_N = 40
#: Fewer cases than this: no bootstrap interval (it would cover much less than its level).
MIN_N_INTERVAL = 20


def hd95_or_penalty(value: float | None) -> float:
    """HD95 with the BraTS penalty for an undefined distance (one of the two masks empty)."""
    return HD95_PENALTY_MM if value is None or not math.isfinite(float(value)) else float(value)


def _signed_sums(d: np.ndarray) -> np.ndarray:
    """The 2^len(d) sums of +-d_i (every sign pattern)."""
    sums = np.zeros(1)
    for value in d:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def _exact_sign_flip_p(d: np.ndarray) -> float:
    """P(|sum of randomly signed d| >= |sum d|), counted over all 2^n sign patterns.

    The n differences are split into two halves; a pattern's sum is one signed sum of the first half
    plus one of the second, so the patterns at least as extreme are counted with a sorted search of the
    second half's 2^(n - n/2) sums for each of the first half's 2^(n/2) sums.  Sums within a relative
    1e-9 of the observed one count as ties (as extreme).
    """
    n = int(d.size)
    observed = abs(float(d.sum()))
    tol = 1e-9 * float(np.abs(d).sum())
    if observed <= tol:
        return 1.0  # the observed sum is 0: every pattern is as extreme
    first = _signed_sums(d[: n // 2])
    second = np.sort(_signed_sums(d[n // 2:]))
    upper = second.size - np.searchsorted(second, observed - tol - first, side="left")  # sum >= observed
    lower = np.searchsorted(second, -observed + tol - first, side="right")  # sum <= -observed
    count = int(upper.sum()) + int(lower.sum())
    return min(1.0, count / float(2 ** n))


def sign_flip_test(differences: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Two-sided paired sign-flip test of mean(differences) == 0.

    Returns the p-value, whether it is exact (every sign pattern counted; up to ``EXACT_MAX_N``
    differences) or a Monte Carlo estimate, and n.  A zero difference changes no pattern's sum, so it
    leaves p as it would be without it; all-zero differences give p = 1.
    """
    d = np.asarray(differences, float)
    n = int(d.size)
    if n == 0:
        return {"n": 0, "p": None, "exact": True}
    if not np.any(d):
        return {"n": n, "p": 1.0, "exact": True}
    if n <= EXACT_MAX_N:
        return {"n": n, "p": _exact_sign_flip_p(d), "exact": True}
    from scipy.stats import permutation_test

    # In batches: all 2^20 resamples at once take 2^20 x n doubles several times over (a 12.8 GB peak at n = 200;
    # 2^12 at a time: 97 MB).
    result = permutation_test((d,), np.mean, permutation_type="samples", n_resamples=2 ** 20,
                              alternative="two-sided", random_state=np.random.default_rng(seed), vectorized=True,
                              axis=-1, batch=2 ** 12)
    return {"n": n, "p": float(min(1.0, result.pvalue)), "exact": False}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error), ``None`` kept in place."""
    indexed = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * float(p)))
        adjusted[i] = running
    return adjusted


def bca_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 10000, seed: int = 0,
                 min_n: int = MIN_N_INTERVAL) -> tuple[float, float] | None:
    """BCa bootstrap interval of the mean, or ``None`` below ``min_n`` cases (or for constant values)."""
    from scipy.stats import bootstrap

    v = np.asarray(values, float)
    if v.size < min_n or np.ptp(v) == 0:
        return None
    result = bootstrap((v,), np.mean, confidence_level=level, n_resamples=resamples, method="BCa",
                       random_state=np.random.default_rng(seed))
    lo, hi = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def minimum_detectable_difference(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest true mean paired difference a two-sided paired t-test detects with ``power``.

    Solved exactly with the noncentral t distribution (``n - 1`` degrees of freedom);
    e.g. n = 27 and SD 0.05 give about 0.028.
    """
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    if n < 2 or not sd > 0:
        return None
    df = n - 1
    critical = t.ppf(1 - alpha / 2, df)

    def shortfall(standardised: float) -> float:  # effect / SD: the power does not depend on the SD's scale
        nc = standardised * math.sqrt(n)
        lower_tail = float(np.nan_to_num(nct.cdf(-critical, df, nc)))  # scipy gives nan where it underflows
        return float(nct.sf(critical, df, nc)) + lower_tail - power

    # Power is alpha < ``power`` at effect 0 and tends to 1 as the effect grows; the upper end of the bracket
    # is doubled until the power there exceeds ``power`` (with 1 or 2 degrees of freedom and a Holm-sized
    # alpha that takes a noncentrality far above the critical value).  Solved in SD units, so a tiny SD
    # (differences equal up to rounding) cannot leave the bracket.
    upper = (critical + 10.0) / math.sqrt(n)
    while shortfall(upper) <= 0.0:
        upper *= 2.0
    return float(brentq(shortfall, 0.0, upper)) * float(sd)


def describe(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return {"n": 0, "mean": None, "sd": None, "median": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def paired_comparison(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 10000,
                      seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Arm a − arm b on the same cases: mean, SD, sign-flip p, BCa interval (where n allows), MDD."""
    d = np.asarray(a, float) - np.asarray(b, float)
    stats = describe(d.tolist())
    test = sign_flip_test(d, seed=seed)
    interval = bca_interval(d, level=level, resamples=resamples, seed=seed)
    mdd = minimum_detectable_difference(stats["sd"] or 0.0, int(d.size), alpha=alpha)
    return {"n": int(d.size), "mean_difference": stats["mean"], "sd_difference": stats["sd"],
            "wins": int(np.sum(d > 0)), "losses": int(np.sum(d < 0)), "p": test["p"], "p_exact": test["exact"],
            "interval": list(interval) if interval else None, "minimum_detectable_difference": mdd}


def holm_family(comparisons: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Adds ``p_holm`` to every comparison of one family (in place) and returns it."""
    names = list(comparisons)
    adjusted = holm([comparisons[k]["p"] for k in names])
    for name, p in zip(names, adjusted):
        comparisons[name]["p_holm"] = p
    return comparisons


__all__ = ["HD95_PENALTY_MM", "EXACT_MAX_N", "MIN_N_INTERVAL", "hd95_or_penalty", "sign_flip_test", "holm",
           "bca_interval", "minimum_detectable_difference", "describe", "paired_comparison", "holm_family"]
