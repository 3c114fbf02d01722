"""Quality gates: bounds on verification metrics; a failed gate makes `optimize` exit 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Gate:
    name: str
    metric: str  # key in the verification summary
    kind: str  # "min" or "max"
    description: str


GATES = {
    g.name: g
    for g in (
        Gate("min_psnr_db", "psnr_db_mean", "min", "mean paired PSNR of final samples vs reference (dB)"),
        Gate("min_ssim", "ssim_mean", "min", "mean paired SSIM of final samples vs reference"),
        Gate(
            "max_eps_rel_error",
            "eps_rel_error_max",
            "max",
            "worst per-step relative error of the model output on the reference trajectory",
        ),
        Gate(
            "max_class_agreement_drop",
            "class_agreement_drop",
            "max",
            "drop of the classifier's agreement with the requested class (fraction)",
        ),
        Gate(
            "max_fd_increase",
            "fd_increase",
            "max",
            "increase of the Fréchet distance to the data, in classifier feature space",
        ),
        Gate(
            "max_fd_to_reference",
            "fd_candidate_to_reference",
            "max",
            "Fréchet distance between candidate and reference samples (same seeds), classifier feature space",
        ),
    )
}


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    bound: float
    value: float | None  # None: the metric does not apply to this model

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.bound if self.gate.kind == "min" else self.value <= self.bound


def check_gate_names(gates: dict[str, Any], where: str) -> None:
    from core.errors import ConfigError
    from core.validate import number

    unknown = sorted(set(gates) - set(GATES))
    if unknown:
        raise ConfigError(f"{where}: unknown gate(s) {unknown} (known: {', '.join(GATES)})")
    for name, value in gates.items():
        number(value, f"{where}: gate {name}")


def evaluate_gates(gates: dict[str, float], summary: dict[str, Any]) -> list[GateResult]:
    return [GateResult(GATES[name], float(bound), summary.get(GATES[name].metric)) for name, bound in gates.items()]


def gates_table(results: list[GateResult]) -> str:
    """A plain-text table for the terminal and the report."""
    rows = [("gate", "bound", "measured", "result")]
    for r in results:
        op = ">=" if r.gate.kind == "min" else "<="
        value = "n/a" if r.value is None else f"{r.value:.6g}"
        verdict = {True: "pass", False: "FAIL", None: "skipped (n/a)"}[r.passed]
        rows.append((r.gate.name, f"{op} {r.bound:g}", value, verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
