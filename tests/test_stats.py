"""harness.reporting.stats against known answers: Demšar (2006)'s worked example, hand computation and scipy."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from harness.reporting import stats
from harness.reporting.leaderboard import StatsOptions


def test_t_interval_by_hand():
    """[1, 2, 3]: mean 2, std 1, t_{0.975, 2} = 4.302653 -> 2 ± 4.302653 / sqrt(3) = 2 ± 2.484138.
    Catches a z quantile (1.96), std with ddof=0 or sqrt(n-1) in the denominator."""
    low, high = stats.t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)


def test_bootstrap_interval_is_seeded_and_agrees_with_scipy():
    """The percentile bootstrap matches scipy.stats.bootstrap(method='percentile') to resampling noise, and the
    same values give the same bounds twice. Catches basic/BCa bounds, swapped tails or an unseeded generator."""
    values = [0.61, 0.64, 0.58, 0.70, 0.66]
    ours = stats.bootstrap_interval(values)
    assert ours == stats.bootstrap_interval(values)
    ref = st.bootstrap((np.array(values),), np.mean, method="percentile", n_resamples=100_000,
                       rng=np.random.default_rng(1)).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.004)


def test_bootstrap_interval_of_three_seeds_is_their_range():
    """From 3 seeds 1/27 of the resamples are the smallest value three times (more than the 2.5% tail), so the
    95% percentile interval is exactly [min, max], as the bootstrap's docstring and the table header say, while
    the t interval of the same values is about 2.5 times wider. Catches a header that claims 95% coverage."""
    values = [0.41, 0.47, 0.44]
    assert stats.bootstrap_interval(values) == (0.41, 0.47)
    low, high = stats.t_interval(values)
    assert (high - low) / (0.47 - 0.41) == pytest.approx(2 * 4.302653 * 0.03 / math.sqrt(3) / 0.06, rel=1e-5)
    assert "a 95% one from 3 seeds is their [min, max]" in StatsOptions(ci="bootstrap").ci_name
    assert StatsOptions(ci="t").ci_name == "Student t"


def test_bootstrap_interval_width_follows_the_standard_error_of_a_mean_of_n():
    """Resamples of all n values: the percentile interval of the mean of 0..9 is about 2 x 1.96 x sigma / sqrt(n)
    wide (sigma the population std, 2.87; the bootstrap mean of 10 draws is close to normal), 3.56.
    Catches resamples of n - 1 values (5% wider) or n + 1 (5% narrower)."""
    values = np.arange(10.0)
    low, high = stats.bootstrap_interval(values)
    assert high - low == pytest.approx(2 * 1.959964 * values.std() / math.sqrt(10), rel=0.03)


@pytest.mark.parametrize("method", stats.CI_METHODS)
def test_mean_interval_follows_the_confidence(method):
    """A 90% interval is the 90% one of the method, narrower than its 95% one (``--alpha 0.1``). Catches a
    confidence dropped on the way (the table's header would then name a level its cells do not have)."""
    values = [0.61, 0.64, 0.58, 0.70, 0.66, 0.63]
    direct = stats.t_interval if method == "t" else stats.bootstrap_interval
    ninety = stats.mean_interval(values, method, confidence=0.9)
    assert ninety == direct(values, 0.9)
    assert ninety[1] - ninety[0] < np.subtract(*stats.mean_interval(values, method, confidence=0.95)[::-1])


def test_fewer_than_three_values_have_no_interval():
    """Two seeds give (nan, nan), not a zero- or absurd-width interval. Catches a missing n<3 guard."""
    for method in stats.CI_METHODS:
        assert np.isnan(stats.mean_interval([0.5, 0.6], method)).all()
        assert np.isfinite(stats.mean_interval([0.5, 0.6, 0.7], method)).all()


def test_paired_t_and_wilcoxon_against_scipy():
    """One comparison: below 6 pairs the p-value is scipy's ttest_rel, from 6 on scipy's wilcoxon, and the interval is the t
    interval of the differences. Catches an unpaired test (ttest_ind: p = 0.14 here, paired: 0.011) or the wrong
    switch."""
    a, b = np.array([0.71, 0.69, 0.74, 0.70, 0.72]), np.array([0.70, 0.66, 0.71, 0.69, 0.70])
    res = stats.paired_test(a, b)
    assert res.test == "paired t" and res.p_value == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert st.ttest_ind(a, b).pvalue > 0.1 > 0.05 > res.p_value
    d = a - b
    half = st.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert (res.ci_low, res.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    a6, b6 = np.append(a, 0.75), np.append(b, 0.70)
    res6 = stats.paired_test(a6, b6)
    assert res6.test == "wilcoxon" and res6.p_value == pytest.approx(st.wilcoxon(a6, b6).pvalue)
    assert res6.p_value == pytest.approx(2 / 2 ** 6)  # every difference positive: exact two-sided p = 2 / 2^n


def test_wilcoxon_only_where_it_can_reject_after_holm():
    """Wilcoxon's smallest two-sided p from n pairs is 2 / 2^n, so among m Holm-corrected comparisons it can
    reject at alpha only when 2^(1-n) m <= alpha: one comparison from 6 pairs, 17 (a column of cifar10-cpu's
    18 rows) from 10; below that the paired t-test is used. Catches a switch at a fixed 6 pairs, under which
    every row of an 18-row table stays tied with the best from 6 to 9 seeds whatever the scores."""
    assert [stats.paired_test_name(n) for n in (5, 6)] == ["paired t", "wilcoxon"]
    assert [stats.paired_test_name(n, comparisons=17) for n in (6, 9, 10)] == ["paired t", "paired t", "wilcoxon"]
    assert stats.paired_test_name(7, comparisons=2, alpha=0.05) == "wilcoxon"  # 2 / 64 = 0.031
    assert stats.paired_test_name(7, comparisons=2, alpha=0.01) == "paired t"
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.7, 0.01, 8), rng.normal(0.6, 0.01, 8)  # 8 seeds, a clearly better
    assert stats.paired_test(a, b, comparisons=17).test == "paired t"
    assert stats.paired_test(a, b, comparisons=17).p_value * 17 < 0.05  # survives Holm; Wilcoxon's 0.0078 x 17 would not
    assert stats.paired_test(a, b, comparisons=1).test == "wilcoxon"


def test_paired_edge_cases():
    """Identical runs: p = 1; a constant non-zero shift under the t-test: p = 0 (scipy gives nan or inf)."""
    assert stats.paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]).p_value == 1.0
    assert stats.paired_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7]).p_value == 0.0


def test_paired_interval_follows_the_confidence():
    """At confidence 0.9 the interval of the differences is mean ± t_{0.95, n-1} * std(ddof=1) / sqrt(n): t_{0.95, 4} =
    2.131847 for these 5 pairs, not the 95% interval's 2.776445. Catches a confidence that never reaches the
    interval (``compare --alpha 0.1`` would print 95% intervals under a 90% heading)."""
    a, b = np.array([0.71, 0.69, 0.74, 0.70, 0.72]), np.array([0.70, 0.66, 0.71, 0.69, 0.70])
    d = a - b
    half = 2.131847 * d.std(ddof=1) / np.sqrt(5)
    res = stats.paired_test(a, b, confidence=0.9)
    assert (res.ci_low, res.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-6)


def test_tied_scores_share_their_average_rank():
    """Demšar's convention: tied methods get the average of the ranks they span. Scores (0.9, 0.9, 0.5) rank
    (1.5, 1.5, 3), (0.8, 0.7, 0.6) rank (1, 2, 3): mean ranks (1.25, 1.75, 3). Catches 'min' ranks for ties (1, 1, 3:
    mean ranks 1, 1.5, 3, which no longer sum to k (k + 1) / 2 per block and inflate chi2_F)."""
    ranks = stats.average_ranks(np.array([[0.9, 0.9, 0.5], [0.8, 0.7, 0.6]]))
    assert ranks.tolist() == pytest.approx([1.25, 1.75, 3.0])


def test_holm_by_hand():
    """p = (0.01, 0.04, 0.03, 0.005): sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04,
    made monotone -> 0.02, 0.03, 0.06, 0.06, returned in input order. Catches Bonferroni (0.04, 0.16, ...),
    a missing running maximum (0.04 for the largest) or results in sorted order."""
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    # 0.6 * 2 = 1.2 must be cut to 1 (0.5 * 2 above is exactly 1 and so cannot tell a missing cap)
    assert stats.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_friedman_of_demsar_2006_section_3_2_4():
    """Demšar's worked example: average ranks 3.143, 2.000, 2.893, 1.964 of 4 classifiers over 14 data sets give
    chi2_F = 9.28 and F_F = 3.69, and the Nemenyi critical difference is 1.25 (his §3.2.4 and Table 5)."""
    res = stats.friedman_from_ranks([3.143, 2.000, 2.893, 1.964], 14)
    assert res.chi2 == pytest.approx(9.28, abs=0.01) and res.iman_davenport_f == pytest.approx(3.69, abs=0.01)
    assert stats.nemenyi_critical_difference(4, 14) == pytest.approx(1.25, abs=0.005)
    # F_F is distributed as F with k - 1 = 3 and (k - 1)(N - 1) = 39 degrees of freedom; Demšar: "the critical value
    # of F(3, 39) for alpha = 0.05 is 2.85", so p < 0.05. Catches N - 1 = 13 denominator degrees of freedom (p = 0.040).
    assert st.f.isf(0.05, 3, 39) == pytest.approx(2.85, abs=0.005)
    assert res.f_p_value == pytest.approx(st.f.sf(res.iman_davenport_f, 3, 39)) and res.f_p_value < 0.05
    for k, q in {2: 1.960, 3: 2.343, 5: 2.728, 10: 3.164}.items():  # Table 5(a), alpha = 0.05
        assert stats.nemenyi_critical_difference(k, 6) == pytest.approx(q * np.sqrt(k * (k + 1) / 36), abs=1e-3)


def test_friedman_matches_scipy_without_ties():
    """On tie-free scores the statistic equals scipy.stats.friedmanchisquare and ranks are 1 for the best."""
    scores = np.random.default_rng(0).normal(size=(9, 4)) + np.array([0.0, 0.5, 1.0, 1.5])
    res = stats.friedman(scores)
    ref = st.friedmanchisquare(*scores.T)
    assert res.chi2 == pytest.approx(ref.statistic) and res.p_value == pytest.approx(ref.pvalue)
    assert np.argmin(res.average_ranks) == 3 and res.average_ranks.sum() == pytest.approx(4 * 5 / 2)


def test_kendall_tau_by_pair_count():
    """tau = (concordant - discordant) / pairs on tie-free scores, counted by hand; 1 for the same order, -1 for
    the reverse."""
    a, b = [0.9, 0.8, 0.7, 0.6, 0.5], [0.8, 0.9, 0.7, 0.5, 0.6]
    signs = [np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in itertools.combinations(range(5), 2)]
    assert stats.kendall_tau(a, b) == pytest.approx(sum(signs) / len(signs)) == pytest.approx(0.6)
    assert stats.kendall_tau(a, a) == pytest.approx(1.0) and stats.kendall_tau(a, a[::-1]) == pytest.approx(-1.0)
