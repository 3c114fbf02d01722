"""Warm-started chunks for policies (Streaming Diffusion Policy, Høeg et al. 2024; Real-Time Iteration, Duan et
al. 2025): after an episode's first decision, the loop runs only its timesteps at or below `timestep`, starting
from the previous chunk's unexecuted remainder noised to the first of them (core.warm_start). The network and
the first decision's loop are unchanged, so open-loop verification (which has no previous chunk) judges the
cold loop; the closed-loop judge runs the warm one. Measured on the PushT reference (BENCHMARKS.md): DDPM at 16
steps warm-started at timestep 30 runs 6 evaluations per later decision and keeps the original's success rate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core import warm_start
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.schedulers import build_scheduler
from passes.base import Context, Pass, PassResult, Phase


@dataclass
class Config:
    timestep: float = 30.0  # warm decisions run the loop's timesteps at or below this one (train-timestep units)


@dataclass(frozen=True)
class WarmStartDecision(Decision):
    timestep: float
    cold_timesteps: list[float]
    warm_timesteps: list[float]

    title = "Warm-started chunks"

    def markdown(self) -> list[str]:
        return [
            f"An episode's first decision runs the whole loop ({len(self.cold_timesteps)} network evaluations,"
            f" timesteps {[round(t) for t in self.cold_timesteps]}); every later decision starts from the previous"
            f" chunk's remainder noised to timestep {self.warm_timesteps[0]:g} and runs {len(self.warm_timesteps)}"
            f" ({[round(t) for t in self.warm_timesteps]}). Open-loop verification judges the first decision's loop;"
            " the closed-loop judge runs the warm one."
        ]


def check_program(config: Config, program: DiffusionProgram) -> None:
    if program.spec.chunking is None:
        raise ConfigError("warm_start: applies to policies (action chunks executed in part, then re-planned)")
    if not 0 <= config.timestep <= program.plan.scheduler_config.get("num_train_timesteps", 1000):
        raise ConfigError("warm_start: timestep must lie within the noise schedule's train timesteps")
    # Whether the loop's grid and sampler allow it is checked when it runs: earlier passes may re-plan the loop.


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    plan = dataclasses.replace(program.plan, warm_start=float(config.timestep))
    tail = warm_start.tail(plan)
    cold = [float(t) for t in build_scheduler(program.plan).timesteps]
    assert tail.timesteps is not None
    decision = WarmStartDecision(float(config.timestep), cold, list(tail.timesteps))
    return PassResult(program.replace(plan=plan), decision)


PASS = Pass(
    name="warm_start",
    phase=Phase.REUSE_POLICY,
    config=Config,
    run=run,
    check_program=check_program,
    doc="warm-started chunks: a policy's later decisions start from its previous chunk, part-way through the loop",
)
