"""Statistics of leaderboards: intervals over seeds, paired tests, Holm, Friedman, Nemenyi, Kendall's tau.

Pure functions on arrays (scipy.stats underneath), so every one can be checked against a textbook
answer. The conventions follow Demšar (2006), "Statistical Comparisons of Classifiers over Multiple
Data Sets", JMLR 7: ranks are 1 for the best (highest) score with ties sharing their average rank,
the Friedman statistic is his eq. (1), the Iman-Davenport F his eq. (2), and the Nemenyi critical
difference his eq. (3) with q_alpha = studentized range quantile / sqrt(2) (his Table 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as st

#: Interval methods: Student t around the mean, or a seeded percentile bootstrap of the mean.
CI_METHODS = ("t", "bootstrap")
#: Fewer seeds than this get no interval (a 2-seed t interval is ~13 std wide; a bootstrap one is degenerate).
MIN_INTERVAL_N = 3
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student t interval of the mean: mean ± t_{(1+c)/2, n-1} * std(ddof=1) / sqrt(n)."""
    x = np.asarray(values, dtype=np.float64)
    half = st.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, §13.3): the seeds are drawn with
    replacement ``resamples`` times from a generator seeded with ``seed``, so the same values give the same
    interval on every machine. Few seeds make it narrow: from 3 values, 1 resample in 27 repeats the smallest
    three times, so a 95% interval is exactly [min, max], which holds the median of a continuous distribution
    with probability 1 - 2 / 2**3 = 75%."""
    x = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[draws].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], method: str = "t", confidence: float = 0.95) -> tuple[float, float]:
    """The ``method`` interval of the mean, or (nan, nan) with fewer than :data:`MIN_INTERVAL_N` values."""
    if len(values) < MIN_INTERVAL_N:
        return float("nan"), float("nan")
    return t_interval(values, confidence) if method == "t" else bootstrap_interval(values, confidence)


@dataclass(frozen=True)
class PairedResult:
    """A two-sided paired comparison of a and b: mean of a - b, its t interval, the test and its p-value."""

    mean_difference: float
    ci_low: float
    ci_high: float
    test: str
    p_value: float
    n: int


def paired_test_name(n_pairs: int, comparisons: int = 1, alpha: float = 0.05) -> str:
    """Wilcoxon's signed-rank test where it can reject: its smallest two-sided p from n pairs, 2 / 2**n, times
    the number of Holm-corrected ``comparisons`` it is one of, at most ``alpha`` (from 6 pairs for one
    comparison at 0.05, from 10 for 17). The paired t-test otherwise: below that Wilcoxon rejects nothing,
    whatever the scores."""
    return "wilcoxon" if 2.0 ** (1 - n_pairs) * comparisons <= alpha else "paired t"


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                comparisons: int = 1) -> PairedResult:
    """Two-sided paired test of a vs b (same seeds in the same order), one of ``comparisons`` that a Holm
    correction at alpha = 1 - ``confidence`` will adjust together.

    Wilcoxon signed-rank (``scipy.stats.wilcoxon``, exact distribution for small n) where it can reject
    (:func:`paired_test_name`), the paired t-test (``scipy.stats.ttest_rel``) otherwise. Two edge
    cases scipy leaves undefined get their limits: identical pairs give p = 1; differences that are all
    the same non-zero number (to rounding) give p = 0 for the t-test (t tends to infinity as their spread goes to 0).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired test needs two equal-length 1-d samples of >= 2 values, got {a.shape} and {b.shape}")
    d = a - b
    low, high = t_interval(d, confidence) if len(d) >= MIN_INTERVAL_N else (float("nan"), float("nan"))
    test = paired_test_name(len(d), comparisons, 1 - confidence)
    if not np.any(d):
        p = 1.0
    elif test == "wilcoxon":
        p = float(st.wilcoxon(a, b).pvalue)
    elif np.ptp(d) <= 1e-12 * np.abs(d).max():  # the same shift up to float rounding of the scores
        p = 0.0
    else:
        p = float(st.ttest_rel(a, b).pvalue)
    return PairedResult(float(d.mean()), low, high, test, p, len(d))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values: the i-th smallest p times (m - i + 1), made
    non-decreasing in that order and capped at 1. Reject where the adjusted value is <= alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """Mean rank of each column (method) over the rows (datasets); 1 = highest score, ties averaged."""
    return st.rankdata(-np.asarray(scores, dtype=np.float64), axis=1).mean(axis=0)


@dataclass(frozen=True)
class FriedmanResult:
    average_ranks: np.ndarray
    chi2: float
    p_value: float
    iman_davenport_f: float
    f_p_value: float
    n_blocks: int


def friedman_from_ranks(avg_ranks: Sequence[float], n_blocks: int) -> FriedmanResult:
    """Friedman's chi2_F (Demšar eq. 1) from the methods' average ranks over ``n_blocks`` datasets, and
    Iman & Davenport's F_F (eq. 2) with (k-1, (k-1)(N-1)) degrees of freedom. No tie correction."""
    r = np.asarray(avg_ranks, dtype=np.float64)
    k, n = len(r), n_blocks
    chi2 = 12 * n / (k * (k + 1)) * (np.sum(r ** 2) - k * (k + 1) ** 2 / 4)
    f = (n - 1) * chi2 / (n * (k - 1) - chi2) if n * (k - 1) > chi2 else float("inf")
    return FriedmanResult(r, float(chi2), float(st.chi2.sf(chi2, k - 1)), float(f),
                          float(st.f.sf(f, k - 1, (k - 1) * (n - 1))) if np.isfinite(f) else 0.0, n)


def friedman(scores: np.ndarray) -> FriedmanResult:
    """Friedman's test of ``scores`` (rows: datasets or columns of a leaderboard, columns: methods)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2 or scores.shape[0] < 2:
        raise ValueError(f"Friedman's test needs >= 2 blocks x >= 2 methods, got shape {scores.shape}")
    return friedman_from_ranks(average_ranks(scores), scores.shape[0])


def nemenyi_critical_difference(k: int, n_blocks: int, alpha: float = 0.05) -> float:
    """Demšar eq. (3): CD = q_alpha sqrt(k (k+1) / (6 N)), q_alpha the studentized range quantile over sqrt 2.
    Two methods whose average ranks differ by at least CD differ significantly (all pairs, level alpha)."""
    q = st.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6 * n_blocks)))


def kendall_tau(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Kendall's tau-b between the rankings two score vectors induce over the same methods
    (``scipy.stats.kendalltau``); 1 = same order, -1 = reversed; nan when either is constant."""
    return float(st.kendalltau(scores_a, scores_b).statistic)
