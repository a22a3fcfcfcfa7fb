"""Confidence intervals for the numbers the stages report: a mean, a paired difference, a rate, a rate over
clustered items."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def mean_ci(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95 % confidence interval), normal approximation: 1.96 · s / √n.

    >>> [round(x, 4) for x in mean_ci([1.0, 2.0, 3.0, 4.0])]  # s = 1.291
    [2.5, 1.2652]
    """
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = statistics.fmean(xs)
    return mean, (Z95 * statistics.stdev(xs) / math.sqrt(n)) if n > 1 else math.inf


def paired_diff_ci(after: Sequence[float], before: Sequence[float]) -> tuple[float, float]:
    """Mean of after − before over the same items, and its 95 % half-width. Pairing removes the spread
    between items (easy versus hard prompts), so the interval is much narrower than two separate ones."""
    if len(after) != len(before):
        raise ValueError(f"paired samples differ in length: {len(after)} and {len(before)}")
    return mean_ci([a - b for a, b in zip(after, before, strict=True)])


def wilson_ci(k: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval (low, high) of a rate k / n; it stays inside [0, 1] even at 0 or n.

    >>> [round(x, 3) for x in wilson_ci(0, 20)]
    [0.0, 0.161]
    """
    if n == 0:
        return math.nan, math.nan
    p, z2 = k / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_diff_ci(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """Difference of two rates k1/n1 − k2/n2 and its 95 % interval (low, high), by Newcombe's hybrid score
    method (1998, method 10): the two Wilson intervals combined. Unlike checking whether the two intervals
    overlap, it has the stated coverage; for rates on the same items it is conservative.

    >>> [round(x, 3) for x in rate_diff_ci(190, 500, 156, 500)]  # 38.0 % vs 31.2 %
    [0.068, 0.009, 0.126]
    """
    if not n1 or not n2:
        return math.nan, math.nan, math.nan
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson_ci(k1, n1), wilson_ci(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def clustered_rate_ci(hits: Sequence[int], sizes: Sequence[int]) -> tuple[float, float]:
    """95 % interval (low, high) of the rate Σ hits / Σ sizes when the items come in clusters (several
    questions about one person) that may share their outcome: the cluster-robust standard error of a ratio
    estimator, √(C / (C − 1) · Σ_c (hits_c − rate · size_c)²) / Σ sizes over C clusters, normal
    approximation, clipped to [0, 1]. With one item per cluster it is close to the plain binomial interval;
    when a cluster's items all go the same way it is as wide as C draws allow, however many items there are.

    >>> clustered_rate_ci([2, 0], [2, 2])  # two people, each answered the same way twice: 0.5 ± 0.98
    (0.0, 1.0)
    >>> clustered_rate_ci([1, 1], [2, 2])  # each person once each way: nothing varies between clusters
    (0.5, 0.5)
    """
    if len(hits) != len(sizes):
        raise ValueError(f"hits and sizes differ in length: {len(hits)} and {len(sizes)}")
    n, c = sum(sizes), len(sizes)
    if n == 0 or c < 2:
        return math.nan, math.nan
    rate = sum(hits) / n
    var = c / (c - 1) * sum((k - rate * m) ** 2 for k, m in zip(hits, sizes, strict=True)) / n**2
    half = Z95 * math.sqrt(var)
    return max(0.0, rate - half), min(1.0, rate + half)


def clustered_diff_ci(
    hits_a: Sequence[float], hits_b: Sequence[float], sizes: Sequence[int]
) -> tuple[float, float, float]:
    """Difference of two rates on the same clustered items, Σ hits_a / Σ sizes − Σ hits_b / Σ sizes (two
    models' answers to the same questions, grouped by the person asked about), and its 95 % interval (low,
    high): `clustered_rate_ci`'s standard error applied to each cluster's difference hits_a − hits_b, so
    that both the pairing (same questions) and the clustering (answers about one person go alike) count.
    Hits may be weighted: half of b's hits test whether a halves b's rate.

    >>> [round(x, 3) for x in clustered_diff_ci([2, 1, 2], [0, 0, 1], [2, 2, 2])]  # 5/6 − 1/6, SE 1/6
    [0.667, 0.34, 0.993]
    """
    if not len(hits_a) == len(hits_b) == len(sizes):
        raise ValueError(f"hits and sizes differ in length: {len(hits_a)}, {len(hits_b)} and {len(sizes)}")
    n, c = sum(sizes), len(sizes)
    if n == 0 or c < 2:
        return math.nan, math.nan, math.nan
    d = (sum(hits_a) - sum(hits_b)) / n
    var = (
        c / (c - 1) * sum((a - b - d * m) ** 2 for a, b, m in zip(hits_a, hits_b, sizes, strict=True)) / n**2
    )
    half = Z95 * math.sqrt(var)
    return d, d - half, d + half
