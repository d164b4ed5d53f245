"""Ratios between benchmark runs taken back to back."""
from __future__ import annotations

import statistics
from typing import Sequence


def paired(base: Sequence[float], other: Sequence[float]) -> tuple[float, float, float]:
    """Median, first and third quartile of other[i] / base[i]. Runs taken back to back share
    the machine's load of the moment, so these ratios show how much one measurement can be
    trusted on a noisy machine, which the ratio of medians alone does not."""
    ratios = [o / b for b, o in zip(base, other)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3
