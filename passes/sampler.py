"""Swap the sampler and/or cut the number of steps (loop level; no retraining).

E.g. a model shipped with DDPM at 100 steps, re-planned as DPM-Solver++ at 20. Verification then
compares the new loop against the original one on the same seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram, SamplingPlan
from core.limits import MAX_STEPS
from core.schedulers import check_plan, with_scheduler
from passes.analyses import CALIBRATION, FLOPS
from passes.base import Context, Pass, PassResult, Phase


@dataclass
class Config:
    scheduler: str = ""  # alias (ddpm, ddim, dpmsolver++, euler) or diffusers class; "" keeps the current one
    steps: int = 0  # 0 keeps the current count


@dataclass(frozen=True)
class SamplerDecision(Decision):
    scheduler_before: str
    steps_before: int
    scheduler: str
    steps: int

    title = "Sampler"

    def markdown(self) -> list[str]:
        return [
            f"- loop re-planned: `{self.scheduler_before}` at {self.steps_before} steps -> `{self.scheduler}` at"
            f" {self.steps} steps; calibration recaptured for the new loop"
        ]


def check(config: Config, capabilities: frozenset[str]) -> None:
    if not 0 <= config.steps <= MAX_STEPS:
        raise ConfigError(f"sampler: steps must be in [0, {MAX_STEPS}] (0 keeps the current count)")


def check_program(config: Config, program: DiffusionProgram) -> None:
    """Before any work: the new loop can be built for this model's scheduler."""
    check_plan(_plan(program, config))


def _plan(program: DiffusionProgram, config: Config) -> SamplingPlan:
    plan = with_scheduler(program.plan, config.scheduler) if config.scheduler else program.plan
    return dataclasses.replace(plan, num_inference_steps=config.steps) if config.steps else plan


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    before, plan = program.plan, _plan(program, config)
    decision = SamplerDecision(
        before.scheduler_class, before.num_inference_steps, plan.scheduler_class, plan.num_inference_steps
    )
    return PassResult(program.replace(plan=plan), decision)


PASS = Pass(
    name="sampler",
    phase=Phase.PLAN,
    config=Config,
    run=run,
    invalidates=frozenset({CALIBRATION, FLOPS}),
    check=check,
    check_program=check_program,
)
