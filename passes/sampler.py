"""Swap the sampler and/or cut the number of steps (loop level; no retraining).

E.g. a model shipped with DDPM at 100 steps, re-planned as DPM-Solver++ at 20. Verification then
compares the new loop against the original one on the same seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from optimizer.errors import ConfigError
from optimizer.ir import DiffusionProgram
from optimizer.limits import MAX_STEPS
from optimizer.pipeline import Context
from optimizer.sampling import check_plan, with_scheduler

NAME = "sampler"
AFTER: tuple[str, ...] = ()
BEFORE: tuple[str, ...] = ()
REQUIRES: tuple[str, ...] = ()


@dataclass
class Config:
    scheduler: str = ""  # alias (ddpm, ddim, dpmsolver++, euler) or diffusers class; "" keeps the current one
    steps: int = 0  # 0 keeps the current count


def check(config: Config, capabilities: frozenset[str]) -> None:
    if not 0 <= config.steps <= MAX_STEPS:
        raise ConfigError(f"sampler: steps must be in [0, {MAX_STEPS}] (0 keeps the current count)")


def check_program(config: Config, program: DiffusionProgram) -> None:
    """Before any work: the new loop can be built for this model's scheduler."""
    check_plan(_plan(program, config))


def _plan(program: DiffusionProgram, config: Config):
    plan = with_scheduler(program.plan, config.scheduler) if config.scheduler else program.plan
    return dataclasses.replace(plan, num_inference_steps=config.steps) if config.steps else plan


def run(program: DiffusionProgram, ctx: Context) -> DiffusionProgram:
    return program.replace(plan=_plan(program, ctx.config))
