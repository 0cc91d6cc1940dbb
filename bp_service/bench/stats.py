"""How far to trust a timing ratio: quartiles and percentiles of the samples, per-round ratios."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def paired_ratio_stats(ours: Sequence[float], peer: Sequence[float]) -> dict[str, float]:
    """How far to trust a timing ratio on a shared machine.

    ``paired_ratio_*``: median and quartiles of the per-round ratios ours/peer (the two samples
    of a round run back to back, so they saw nearly the same machine). ``ratio_p10`` and
    ``ratio_min``: the ratio of the sides' 10th percentiles and minima, the rounds least
    disturbed by other processes. When these disagree with the headline ratio of medians,
    the run was noisy: rerun it with more ``--reps``.
    """
    q1, q2, q3 = quartiles([a / b for a, b in zip(ours, peer)])
    return {
        "paired_ratio_median": q2,
        "paired_ratio_q1": q1,
        "paired_ratio_q3": q3,
        "ratio_p10": percentile(ours, 0.1) / percentile(peer, 0.1),
        "ratio_min": min(ours) / min(peer),
    }
