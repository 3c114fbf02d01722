"""One option per item, the cheapest total within an additive budget: a small integer program.

The formulation of modelopt's auto_quantize (per-layer formats by measured sensitivity, chosen by integer
programming), with the error as the constraint and the cost as the objective. Solved exactly by scipy's
`milp` (HiGHS); no hand-written knapsack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cheapest_within(costs: Sequence[Sequence[float]], risks: Sequence[Sequence[float]], budget: float) -> list[int]:
    """For each item i, the index of its chosen option: minimizes the summed costs[i][j] subject to the
    summed risks[i][j] <= budget. Every item needs an option of zero risk (e.g. fp32), so a solution exists."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if len(costs) != len(risks) or any(len(c) != len(r) for c, r in zip(costs, risks, strict=True)):
        raise ValueError("costs and risks must have the same shape")
    if any(min(r) > 0 for r in risks):
        raise ValueError("every item needs an option of zero risk")
    sizes = [len(c) for c in costs]
    n = sum(sizes)
    if n == 0:
        return []
    starts = np.cumsum([0, *sizes[:-1]])
    one_each = np.zeros((len(sizes), n))
    for i, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        one_each[i, start : start + size] = 1.0
    risk_row = np.concatenate([np.asarray(r, dtype=float) for r in risks])[None, :]
    cost = np.concatenate([np.asarray(c, dtype=float) for c in costs])
    result = milp(
        cost / max(float(np.abs(cost).max()), 1e-12),  # scaled: HiGHS' tolerances are absolute
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(risk_row, -np.inf, max(budget, 0.0)),
        ],
    )
    if not result.success:
        raise RuntimeError(f"integer program not solved: {result.message}")
    x = np.round(result.x)
    return [int(np.argmax(x[start : start + size])) for start, size in zip(starts, sizes, strict=True)]


__all__ = ["cheapest_within"]
