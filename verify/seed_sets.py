"""A distribution gate decided on disjoint seed sets drawn one at a time.

One artifact's shift moves with the seed set it is judged on: sd-digits' 4-step student measured 0.025 to 0.044
over six disjoint 100-seed evaluation sets, against a bound of 0.03 (BENCHMARKS.md), so one set's verdict can be
an accident of its seeds. Verification therefore judges the candidate on at least MIN_SETS disjoint sets (each
with its own reference and floor set) and estimates the shift by their mean, with a 95% confidence interval from
their spread (Student's t with K - 1 degrees of freedom: the sets are independent draws, so no resampling, which
overstated the spread here: bootstrap ~1.8x, jackknife ~2x with more features than samples). While the bound
lies inside that interval, another set is drawn, up to the run's --seed-sets; a gate whose bound is still inside
it is decided by the mean and marked as such.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from scipy import stats

from verify.judges.base import ratio

MIN_SETS = 2  # the fewest sets that measure the seed noise
CONFIDENCE = 0.95  # a gate is decided once its bound lies outside the mean's two-sided interval
POOLED = ("shift", "shift_mean", "shift_cov", "candidate", "floor", "paired")  # {prefix}_* averaged over the sets


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """The mean of per-set values and its standard error (nan with one set)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def half_width(values: Sequence[float]) -> float:
    """Half the width of the mean's CONFIDENCE interval over the sets (nan with one set): two sets that happen
    to agree (1 degree of freedom) give a wide one, t = 12.7 standard errors."""
    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1)) * mean_and_error(values)[1]


def undecided(values: Sequence[float], bound: float, min_sets: int = MIN_SETS) -> bool:
    """Whether a gate on the mean of `values` needs another set: the bound lies inside the mean's confidence
    interval. A non-finite value (a diverged candidate) decides at once."""
    if not all(math.isfinite(v) for v in values):
        return False
    if len(values) < min_sets:
        return True
    return abs(statistics.fmean(values) - bound) <= half_width(values)


def pool(summaries: Sequence[dict[str, Any]], prefixes: Sequence[str]) -> dict[str, Any]:
    """The first set's summary with each distribution metric of `prefixes` averaged over every set's, the
    per-set shifts and the shift's standard error and 95% half-width beside it. Paired and adherence metrics
    stay the first set's (the per-step errors are measured there)."""
    pooled = dict(summaries[0])
    for prefix in prefixes:
        if any(s.get(f"{prefix}_shift") is None for s in summaries):
            continue
        for key in POOLED:
            pooled[f"{prefix}_{key}"] = statistics.fmean(float(s[f"{prefix}_{key}"]) for s in summaries)
        pooled[f"{prefix}_ratio"] = ratio(pooled[f"{prefix}_candidate"], pooled[f"{prefix}_floor"])
        shifts = [float(s[f"{prefix}_shift"]) for s in summaries]
        pooled[f"{prefix}_shift_sets"] = shifts
        measured = len(shifts) > 1 and all(map(math.isfinite, shifts))
        pooled[f"{prefix}_shift_se"] = mean_and_error(shifts)[1] if measured else None  # None: not measured
        pooled[f"{prefix}_shift_ci"] = half_width(shifts) if measured else None
    pooled["seed_sets"] = len(summaries)
    return pooled
