"""Swap the sampler and/or cut the number of steps (loop level; no retraining).

E.g. a model shipped with DDPM at 100 steps, re-planned as DPM-Solver++ at 20. Verification then
compares the new loop against the original one on the same seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from optimizer.errors import ConfigError
from optimizer.ir import DiffusionProgram
from optimizer.pipeline import Context
from optimizer.sampling import with_scheduler

NAME = "sampler"
AFTER: tuple[str, ...] = ()
BEFORE: tuple[str, ...] = ()
REQUIRES: tuple[str, ...] = ()


@dataclass
class Config:
    scheduler: str = ""  # alias (ddpm, ddim, dpmsolver++, euler) or diffusers class; "" keeps the current one
    steps: int = 0  # 0 keeps the current count


def run(program: DiffusionProgram, ctx: Context) -> DiffusionProgram:
    config: Config = ctx.config
    if config.steps < 0:
        raise ConfigError("sampler: steps must be >= 0")
    plan = with_scheduler(program.plan, config.scheduler) if config.scheduler else program.plan
    if config.steps:
        plan = dataclasses.replace(plan, num_inference_steps=config.steps)
    return program.replace(plan=plan)
