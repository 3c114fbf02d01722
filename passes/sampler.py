"""Swap the sampler and/or cut the number of steps (loop level; no retraining).

E.g. a model shipped with DDPM at 100 steps, re-planned as DPM-Solver++ at 20. Verification then
compares the new loop against the original one on the same seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram, SamplingPlan
from core.limits import MAX_STEPS
from core.schedulers import check_plan, with_scheduler
from passes.analyses import CALIBRATION, FLOPS
from passes.base import Context, Pass, PassResult, Phase


@dataclass
class Config:
    scheduler: str = ""  # alias (ddpm, ddim, dpmsolver++, euler) or diffusers class; "" keeps the current one
    sampling_steps: int = 0  # the loop's step count; 0 keeps the current count
    # `steps` counts training steps in every pass; this pass's loop step count is `sampling_steps` (issue 34).
    RENAMED: ClassVar[dict[str, str]] = {"steps": "sampling_steps"}


@dataclass(frozen=True)
class SamplerDecision(Decision):
    scheduler_before: str
    sampling_steps_before: int
    scheduler: str
    sampling_steps: int

    title = "Sampler"

    def markdown(self) -> list[str]:
        return [
            f"- loop re-planned: `{self.scheduler_before}` at {self.sampling_steps_before} steps ->"
            f" `{self.scheduler}` at {self.sampling_steps} steps; calibration recaptured for the new loop"
        ]


def check(config: Config, capabilities: frozenset[str]) -> None:
    if not 0 <= config.sampling_steps <= MAX_STEPS:
        raise ConfigError(f"sampler: sampling_steps must be in [0, {MAX_STEPS}] (0 keeps the current count)")


def check_program(config: Config, program: DiffusionProgram) -> None:
    """Before any work: the new loop can be built for this model's scheduler."""
    check_plan(_plan(program, config))


def _plan(program: DiffusionProgram, config: Config) -> SamplingPlan:
    plan = with_scheduler(program.plan, config.scheduler) if config.scheduler else program.plan
    return dataclasses.replace(plan, num_inference_steps=config.sampling_steps) if config.sampling_steps else plan


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
