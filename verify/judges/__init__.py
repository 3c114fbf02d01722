"""Judges, one module each (`JUDGE = ...`), found by scanning this package, and what the planner asks of
them before any work: which metrics a model's judges can compute, so which gates apply to it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from core.discovery import module_members
from core.ir import DiffusionProgram
from verify.judges.base import Judge, JudgeOptions, Metric, Outputs

__all__ = ["Judge", "JudgeOptions", "JudgePlan", "Metric", "Outputs", "judges", "plan_judges", "source_of"]


@cache
def judges() -> dict[str, Judge]:
    """Every judge module's JUDGE, by judge name (paired first: its metrics lead the report)."""
    found = [j for j in module_members(__name__, "JUDGE", ("base",)).values() if j is not None]
    found.sort(key=lambda j: (j.name != "paired", j.name))
    return {j.name: j for j in found}


def source_of(metric: str) -> Judge | None:
    """The judge that provides `metric` (None: no judge does)."""
    return next((j for j in judges().values() if metric in j.metric_keys()), None)


@dataclass(frozen=True)
class JudgePlan:
    """The judges that apply to one model (with the options given) and why the others do not."""

    active: tuple[Judge, ...]
    provided: frozenset[str]
    reasons: dict[str, str]  # judge name -> why it does not apply
    options: JudgeOptions

    def measures(self, metric: str) -> bool:
        return metric in self.provided

    def why_not(self, metric: str) -> str:
        """Why `metric` is not measured for this model: its judge and what that judge applies to."""
        judge = source_of(metric)
        if judge is None:
            return "no judge computes it"
        return f"{judge.name} judge: {self.reasons.get(judge.name, 'does not give it for this model')}"


def plan_judges(program: DiffusionProgram, options: JudgeOptions) -> JudgePlan:
    """Each judge's options checked (a missing or wrong feature model: one line, before any work), then
    the judges that apply to `program`."""
    active: list[Judge] = []
    provided: set[str] = set()
    reasons: dict[str, str] = {}
    for judge in judges().values():
        judge.check_options(options)
        keys = judge.provides(program, options)
        if keys:
            active.append(judge)
            provided |= keys
        else:
            reasons[judge.name] = judge.why_not(program, options)
    return JudgePlan(tuple(active), frozenset(provided), reasons, options)
