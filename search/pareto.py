"""The search's candidates for the report: every evaluated one in a table, the Pareto front of speed
against fidelity, and its plot (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.fileio import write_atomic

PLOT_FILE = "pareto.png"


def fidelity_axis(rows: list[dict[str, Any]]) -> tuple[str, str, bool]:
    """(metric, label, lower is better): the distribution shift in the denoiser's own features (every model
    has it), else PSNR."""
    if rows and all(r["metrics"].get("fd_self_shift") is not None for r in rows):
        return "fd_self_shift", "distribution shift in the denoiser's features (proxy seeds; lower is better)", True
    return "psnr_db_mean", "PSNR vs the original's samples (proxy seeds, dB; higher is better)", False


def front(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of the rows no other row beats on both speed and fidelity (feasible or not)."""
    metric, _, lower = fidelity_axis(rows)
    sign = -1.0 if lower else 1.0

    def point(r: dict[str, Any]) -> tuple[float, float]:
        value = r["metrics"].get(metric)
        return r["metrics"]["speedup"], sign * value if value == value and value is not None else float("-inf")

    points = [point(r) for r in rows]
    return [
        i
        for i, (s, f) in enumerate(points)
        if not any((s2 >= s and f2 >= f) and (s2 > s or f2 > f) for s2, f2 in points)
    ]


def plot(rows: list[dict[str, Any]], chosen: int | None, path: Path, bound: float | None = None) -> None:
    """`bound`: the gate on the fidelity axis, drawn as a line (None: none)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, label, lower = fidelity_axis(rows)
    on_front = set(front(rows))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for feasible, marker, name in ((True, "o", "meets the gates (proxy)"), (False, "x", "violates a gate (proxy)")):
        pts = [
            (r["metrics"]["speedup"], r["metrics"].get(metric)) for r in rows if r["metrics"]["feasible"] is feasible
        ]
        pts = [(s, f) for s, f in pts if f is not None and f == f]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=name, color="tab:blue" if feasible else "tab:red")
    line = sorted((rows[i]["metrics"]["speedup"], rows[i]["metrics"].get(metric)) for i in on_front)
    line = [(s, f) for s, f in line if f is not None and f == f]
    if line:
        ax.plot(*zip(*line, strict=True), color="gray", linestyle="--", linewidth=1, label="Pareto front")
    if chosen is not None:
        r = rows[chosen]["metrics"]
        ax.scatter([r["speedup"]], [r.get(metric)], marker="*", s=250, color="gold", edgecolor="black", label="chosen")
    for r in rows:
        value = r["metrics"].get(metric)
        if value is not None and value == value:
            ax.annotate(
                str(r["number"]),
                (r["metrics"]["speedup"], value),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    if bound is not None:
        ax.axhline(bound, color="tab:red", linewidth=0.8, linestyle=":", label="gate")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x" if round(v, 6) in (2, 3, 5, 20, 30, 50) else "")
    )
    ax.set_xlabel("speedup over the original's fp32 graph (whole loop, same backend, side by side; log)")
    ax.set_ylabel(label)
    if lower:
        ax.set_yscale("symlog", linthresh=1.0)  # a diverged candidate's FD would flatten the rest
        values = [r["metrics"].get(metric) for r in rows]
        worst = max([v for v in values if v is not None and v == v] + [bound or 1.0])
        ax.set_ylim(worst * 1.5, 0)  # inverted: better fidelity up
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Search candidates (trial numbers); up and right is better", fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def table(rows: list[dict[str, Any]], knobs: list[str], chosen: int | None) -> list[str]:
    on_front = set(front(rows))
    head = [
        *knobs,
        "NFE",
        "GFLOPs/image",
        "speedup",
        "PSNR (dB)",
        "distribution shift",
        "agreement drop",
        "feasible",
        "front",
        "s",
    ]
    lines = ["| trial | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for i, r in enumerate(rows):
        m = r["metrics"]
        cells = [*(r["params"][k] for k in knobs), str(m["nfe"]), f"{m['flops_per_image'] / 1e9:.3f}"]
        cells += [f"{m['speedup']:.2f}x", _num(m.get("psnr_db_mean")), _num(m.get("fd_self_shift"))]
        cells += [_num(m.get("class_agreement_drop")), "yes" if m["feasible"] else "no"]
        cells += ["yes" if i in on_front else "", f"{m['seconds']:.0f}"]
        mark = " (chosen)" if i == chosen else ""
        lines.append(f"| {r['number']}{mark} | " + " | ".join(cells) + " |")
    return lines


def _num(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}"
