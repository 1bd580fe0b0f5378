"""The paired t-test: is the mean of seed-by-seed differences (one setting minus another, same seed)
distinguishable from zero?"""
import math
import statistics
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PairedT:
    n: int
    mean: float
    sd: float  # sample standard deviation of the differences (n - 1)
    low: Optional[float]  # the confidence interval of the mean; None with fewer than two pairs
    high: Optional[float]
    p: Optional[float]  # two-sided p-value of "the mean difference is 0"


def paired_t(differences: list[float], confidence: float = 0.95) -> PairedT:
    """Student's t on the differences: t = mean / (sd / sqrt(n)) with n - 1 degrees of freedom."""
    from scipy import stats

    n = len(differences)
    if n == 0:
        raise ValueError("paired_t needs at least one difference")
    mean = statistics.fmean(differences)
    if n < 2:
        return PairedT(n, mean, 0.0, None, None, None)
    sd = statistics.stdev(differences)
    se = sd / math.sqrt(n)
    if se == 0.0:  # every pair differs by the same amount: the interval is a point
        return PairedT(n, mean, sd, mean, mean, 1.0 if mean == 0.0 else 0.0)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return PairedT(n, mean, sd, mean - half, mean + half, p)
