"""Each pass's share of the chosen recipe's speedup and fidelity drop: the program after every prefix of
the recipe, lowered and timed side by side in one run, and judged on the proxy seeds.

Speed shares are of the log speedup (they add up: 2x then 2x is 4x, half each); fidelity shares are of
the change in the distribution shift (the FD beyond the original's seed-to-seed floor, in the denoiser's
own features; the original itself is at 0), signed: a pass that restores fidelity (recovery) has a negative
share, and the shares of the others exceed 100%."""

from __future__ import annotations

import math
from typing import Any

from core.ir import DiffusionProgram
from passes.manager import PlannedPass, prefix_key
from search.trials import TrialRunner


def attribute(runner: TrialRunner, planned: list[PlannedPass]) -> list[dict[str, Any]]:
    """Rows per pass of `planned` (already run by `runner` with its prefix cache)."""
    programs: list[DiffusionProgram] = [runner.cache[prefix_key(planned[: i + 1])][0] for i in range(len(planned))]
    timings = runner.time(programs)
    fidelity = [runner.proxy.measure(p) for p in programs]
    original_ms = timings[-1]["original_loop_ms"]
    total_log = math.log(original_ms / timings[-1]["loop_ms"]) if timings else 0.0
    metric = "fd_self_shift" if fidelity and fidelity[-1].get("fd_self_shift") is not None else "psnr_db_mean"
    start = 0.0 if metric == "fd_self_shift" else None  # the original's own shift
    values: list[Any] = [f.get(metric) for f in fidelity]
    total_change = (values[-1] - (start if start is not None else values[0])) if values else 0.0
    rows, before_ms, before_value = [], original_ms, start
    for q, t, value in zip(planned, timings, values, strict=True):
        step_log = math.log(before_ms / t["loop_ms"])
        change = None if before_value is None or value is None else value - before_value
        rows.append(
            {
                "pass": q.name,
                "loop_ms": t["loop_ms"],
                "speedup_so_far": original_ms / t["loop_ms"],
                "speed_share": step_log / total_log if abs(total_log) > 1e-9 else None,
                "fidelity_metric": metric,
                "fidelity_so_far": value,
                "fidelity_change": change,
                "fidelity_share": change / total_change if change is not None and abs(total_change) > 1e-9 else None,
            }
        )
        before_ms, before_value = t["loop_ms"], value
    return rows


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    metric = "distribution shift" if rows[0]["fidelity_metric"] == "fd_self_shift" else "PSNR (dB)"
    lines = [
        f"| after pass | loop ms | speedup so far | share of the speedup (log) | {metric} so far | {metric} change"
        f" | share of the {metric} change |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pass']} | {r['loop_ms']:.1f} | {r['speedup_so_far']:.2f}x | {_pct(r['speed_share'])} | "
            f"{_num(r['fidelity_so_far'])} | {_signed(r.get('fidelity_change'))} | {_pct(r['fidelity_share'])} |"
        )
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3g}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
