"""Paired tests of one setting against another, seed by seed (the same seed in both): SciPy's paired
t-test (`scipy.stats.ttest_rel`) with its confidence interval, Wilcoxon's signed-rank test beside it
(`scipy.stats.wilcoxon`, exact, two-sided), and Holm's correction over a family of comparisons."""
import statistics
import sys
from dataclasses import dataclass, replace
from typing import Optional, Sequence


@dataclass(frozen=True)
class PairedTests:
    n: int
    mean: float  # mean of first - second
    sd: float  # sample standard deviation of the differences (n - 1)
    low: Optional[float]  # the t confidence interval of the mean; None with fewer than two pairs
    high: Optional[float]
    t_p: Optional[float]  # two-sided p of the paired t-test that the mean difference is 0
    wilcoxon_p: Optional[float]  # two-sided exact p of the signed-rank test (zero differences left out)
    t_p_holm: Optional[float] = None  # the same, Holm-adjusted over the comparisons shown together
    wilcoxon_p_holm: Optional[float] = None


def paired_tests(first: Sequence[float], second: Sequence[float], confidence: float = 0.95) -> PairedTests:
    """`first[i]` and `second[i]` are one seed's values in the two settings."""
    from scipy import stats

    if len(first) != len(second):
        raise ValueError(f"paired tests need one value of each setting per seed; got {len(first)} and {len(second)}")
    differences = [a - b for a, b in zip(first, second)]
    n = len(differences)
    if n == 0:
        raise ValueError("paired tests need at least one pair")
    mean = statistics.fmean(differences)
    if n < 2:
        return PairedTests(n, mean, 0.0, None, None, None, None)
    sd = statistics.stdev(differences)
    wilcoxon_p = float(stats.wilcoxon(first, second, zero_method="wilcox", alternative="two-sided",
                                      method="exact").pvalue)
    if max(differences) == min(differences):  # every pair differs alike: SciPy's t is inf or NaN
        return PairedTests(n, mean, sd, mean, mean, 1.0 if mean == 0.0 else 0.0, wilcoxon_p)
    t = stats.ttest_rel(first, second, alternative="two-sided")
    interval = t.confidence_interval(confidence)
    return PairedTests(n, mean, sd, float(interval.low), float(interval.high), float(t.pvalue), wilcoxon_p)


def holm(p_values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (None: no test, left out of the family)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))  # adjusted p-values never decrease
        adjusted[i] = running
    return adjusted


def with_holm(family: Sequence[PairedTests]) -> list[PairedTests]:
    """The tests of a family of comparisons, each with its p-values Holm-adjusted over the family."""
    t_holm, w_holm = holm([f.t_p for f in family]), holm([f.wilcoxon_p for f in family])
    return [replace(f, t_p_holm=t, wilcoxon_p_holm=w) for f, t, w in zip(family, t_holm, w_holm)]


if __name__ == "__main__":  # a library: `python -m` on it would otherwise print nothing and exit 0
    sys.exit("mgssl.tools.stats is a library, not a command; `mgssl --help` lists the commands")
