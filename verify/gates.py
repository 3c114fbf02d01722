"""Quality gates: bounds on verification metrics. A gate applies to a model when one of its judges
computes the metric (decided before any work); an applicable gate whose metric is missing was not
measured and fails, as a failed bound does (`optimize` exits 1); a run passes only when every
applicable gate was measured and held."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError


@dataclass(frozen=True)
class Gate:
    name: str
    metric: str  # key in the verification summary
    kind: str  # "min" or "max"
    description: str
    # A distribution gate's metric prefix: its terms, FD and floor are shown beside the shift.
    detail: str | None = None


def _shift_gate(name: str, prefix: str, space: str) -> Gate:
    return Gate(
        name,
        f"{prefix}_shift",
        "max",
        f"distribution shift: the Fréchet distance of the candidate's samples to a disjoint draw of the original"
        f" (other seeds, same conditions) beyond the original's own distance to it (the floor), per standardized"
        f" feature, its mean term unbiased from the paired seeds (verify.metrics.distribution_shift; 0: the"
        f" original's distribution, whatever the sample count), {space}",
        prefix,
    )


GATES = {
    g.name: g
    for g in (
        Gate("min_psnr_db", "psnr_db_mean", "min", "mean paired PSNR of the final outputs vs the reference (dB)"),
        Gate("min_ssim", "ssim_mean", "min", "mean paired SSIM of the final outputs vs the reference"),
        Gate(
            "max_eps_rel_error",
            "eps_rel_error_max",
            "max",
            "worst per-step relative error of the model output on the reference trajectory",
        ),
        _shift_gate("max_fd_self_shift", "fd_self", "in the original denoiser's own features (any model)"),
        Gate(
            "max_class_agreement_drop",
            "class_agreement_drop",
            "max",
            "drop of the digits classifier's agreement with the requested digit (fraction; the zoo's models)",
        ),
        _shift_gate("max_fd_digits_shift", "fd_digits", "in the digits classifier's features (the zoo's models)"),
        Gate("max_clip_score_drop", "clip_score_drop", "max", "drop of the mean CLIP score (--clip; prompts)"),
        _shift_gate("max_fd_clip_shift", "fd_clip", "in CLIP image features (--clip)"),
        _shift_gate("max_fid_shift", "fid", "in Inception-v3 pool features, FID (--inception)"),
        Gate(
            "max_success_shortfall",
            "success_shortfall",
            "max",
            "policies, closed loop: how far the candidate's success rate lies below the low end of the original's"
            " 95% interval on the same episodes (0: within it)",
        ),
        Gate(
            "max_mode_recall_drop",
            "mode_recall_drop",
            "max",
            "policies: how much less of the original's action-chunk modes the candidate covers per observation than"
            " a second draw of the original does (improved recall, Kynkäänniemi et al. 2019; 0: as the original)",
        ),
    )
}

PASS, FAIL, NOT_MEASURED, NOT_APPLICABLE = "pass", "FAIL", "not measured", "not applicable"


def check_gate_names(gates: dict[str, Any], where: str) -> None:
    from core.validate import number

    unknown = sorted(set(gates) - set(GATES))
    if unknown:
        raise ConfigError(f"{where}: unknown gate(s) {unknown} (known: {', '.join(GATES)})")
    for name, value in gates.items():
        number(value, f"{where}: gate {name}")


@dataclass(frozen=True)
class GatePlan:
    """The gates asked for (the target's, then the command line's) and, of those, the ones no judge of
    this model computes (gate -> why): shown, not counted."""

    bounds: dict[str, float]
    skipped: dict[str, str]

    @property
    def applicable(self) -> dict[str, float]:
        return {g: b for g, b in self.bounds.items() if g not in self.skipped}

    def to_dict(self) -> dict[str, Any]:
        return {"applicable": self.applicable, "not_applicable": self.skipped}


def plan_gates(bounds: dict[str, float], judges: Any, explicit: Collection[str] = ()) -> GatePlan:
    """Which gates `judges` (a verify.judges.JudgePlan) can measure. Refused (ConfigError, before any
    work): a gate given on the command line that no judge of this model computes, and a set of gates none
    of which applies (nothing would be measured)."""
    skipped = {g: judges.why_not(GATES[g].metric) for g in bounds if not judges.measures(GATES[g].metric)}
    for name in explicit:
        if name in skipped:
            raise ConfigError(f"gate {name} cannot be measured on this model ({skipped[name]})")
    if len(skipped) == len(bounds):
        listed = "; ".join(f"{g} ({why})" for g, why in skipped.items()) or "the target has no gates"
        raise ConfigError(
            f"none of the gates can be measured on this model: {listed}; add one its judges compute, e.g."
            " --gate max_fd_self_shift=0.03"
        )
    return GatePlan(dict(bounds), skipped)


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    bound: float
    value: float | None
    status: str  # PASS, FAIL, NOT_MEASURED or NOT_APPLICABLE
    reason: str = ""  # why a gate does not apply, or what was measured beside it (a floor)

    @property
    def passed(self) -> bool | None:
        """True: measured and held; False: failed or not measured; None: not applicable to this model."""
        return None if self.status == NOT_APPLICABLE else self.status == PASS


def evaluate_gates(plan: GatePlan, summary: dict[str, Any]) -> list[GateResult]:
    results = []
    for name, bound in plan.bounds.items():
        gate = GATES[name]
        if name in plan.skipped:
            results.append(GateResult(gate, float(bound), None, NOT_APPLICABLE, plan.skipped[name]))
            continue
        value = summary.get(gate.metric)
        if value is None:
            results.append(GateResult(gate, float(bound), None, NOT_MEASURED, "the verification has no value for it"))
            continue
        value = float(value)
        held = value >= bound if gate.kind == "min" else value <= bound  # NaN holds no bound
        detail = ""
        if gate.detail and summary.get(f"{gate.detail}_candidate") is not None:
            p = gate.detail
            detail = (
                f"{_seed_noise(summary, p)}; mean {_num(summary[f'{p}_shift_mean'])} +"
                f" cov {_num(summary[f'{p}_shift_cov'])}; FD {_num(summary[f'{p}_candidate'])} vs floor"
                f" {_num(summary[f'{p}_floor'])}"
            )
        results.append(GateResult(gate, float(bound), value, PASS if held else FAIL, detail))
    return results


def _seed_noise(summary: dict[str, Any], prefix: str) -> str:
    """How many seed sets the shift is the mean of, and its 95% interval over them (verify.seed_sets)."""
    sets = summary.get(f"{prefix}_shift_sets") or [summary[f"{prefix}_shift"]]
    if len(sets) < 2:
        return "1 seed set: seed noise not measured"
    ci = summary.get(f"{prefix}_shift_ci")
    words = f"mean of {len(sets)} seed sets ({', '.join(_num(v) for v in sets)}), 95% interval +- {_num(ci)}"
    if prefix in summary.get("seed_sets_within_noise", ()):
        words += ", which holds the bound: decided by the mean"
    return words


def passed(results: list[GateResult]) -> bool:
    """Every applicable gate measured and held, and at least one was: a run that measured nothing fails."""
    return all(r.passed is not False for r in results) and any(r.passed for r in results)


def verdict_line(results: list[GateResult]) -> str:
    """The one-line verdict the CLI prints under the table."""
    if passed(results):
        return "PASS"
    failed = [r.gate.name for r in results if r.status == FAIL]
    unmeasured = [r.gate.name for r in results if r.status == NOT_MEASURED]
    parts = [
        f"{what}: {', '.join(names)}" for what, names in (("failed", failed), ("not measured", unmeasured)) if names
    ]
    return "FAIL: " + ("; ".join(parts) if parts else "no gate was measured")


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4g}" if math.isfinite(float(value)) else str(float(value))


def gates_table(results: list[GateResult]) -> str:
    """A plain-text table for the terminal and the report."""
    rows = [("gate", "bound", "measured", "result", "detail")]
    for r in results:
        op = ">=" if r.gate.kind == "min" else "<="
        rows.append((r.gate.name, f"{op} {r.bound:g}", "n/a" if r.value is None else _num(r.value), r.status, r.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
