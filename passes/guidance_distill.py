"""Guidance distillation: fold classifier-free guidance into the network, one evaluation per step.

Meng et al. 2023 ("On Distillation of Guided Diffusion Models", stage one): a student initialized from
the teacher learns to output, from the conditional input alone, the teacher's guided output
uncond + w (cond - uncond) at the plan's scale w (fixed). Data-free: the inputs are the teacher's own
final samples re-noised at the plan's timesteps (or any training timestep, half the batch), with
their conditions. The loop then runs without the unconditional branch: half the network evaluations
at the same step count. The student becomes the reference of later passes.

With `max_fd_shift`, the student is judged as the verification judges the result (verify.floor_check: its
samples' distribution shift from the original, in the original denoiser's features) after every `steps`, and
trains on (a cosine warm restart each time, SGDR) while it is over the bound, up to `max_steps`; the report
shows every check. Per-step loss does not see this: dit-digits' student at loss 0.0014 after 400 steps was at
1.60 of the floor, 1.40 after 1200 (the former FD ratio).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import partial

import torch

from core import seeds
from core.adapters import denoiser_module
from core.distill import FirstOrder, call, grid, teacher_data
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from core.sampling import uses_guidance
from core.training import Trainer, train_checked
from passes.analyses import CALIBRATION, FLOPS
from passes.base import Context, Pass, PassResult, Phase, check_distribution_options

DATA_SEED = seeds.GUIDANCE_DISTILL  # the teacher's samples, + the run's --seed (core.seeds)


@dataclass
class Config:
    steps: int = 1000
    batch: int = 32
    lr: float = 2e-4
    samples: int = 256  # teacher samples re-noised as training inputs
    max_seconds: float = 900.0  # for all of the training
    max_fd_shift: float = 0.0  # the student's distribution shift to reach (0: not checked)
    check_samples: int = 100  # samples of the distribution check (its seed-to-seed noise shrinks with more)
    max_steps: int = 0  # with max_fd_shift: train on in chunks of `steps` up to this many (0: `steps`)


@dataclass(frozen=True)
class GuidanceDistillDecision(Decision):
    scale: float
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    max_fd_shift: float = 0.0
    checks: list[dict] = dataclasses.field(default_factory=list)  # per chunk: steps so far, distribution shift
    floor_fd: float | None = None

    title = "Guidance distillation"

    def markdown(self) -> list[str]:
        lines = [
            f"- guidance scale {self.scale} folded into the network: one evaluation per step instead of two",
            f"- {self.steps} steps in {self.seconds} s; loss (student vs guided teacher, energy-normalized)"
            f" {self.loss_first} -> {self.loss_last}",
        ]
        if self.checks:
            held = self.checks[-1]["fd_shift"] <= self.max_fd_shift
            lines.append(
                f"- distribution check (the distribution shift, verify.metrics.distribution_shift; the original's own"
                f" FD to the floor set {self.floor_fd:.4g}; bound {self.max_fd_shift:g}) after "
                + ", ".join(f"{c['steps']} steps: {c['fd_shift']:.3g}" for c in self.checks)
                + ("" if held else " -- not reached within max_steps; the verification judges the result")
            )
        return lines


def check(config: Config, capabilities: frozenset[str]) -> None:
    if (
        not 1 <= config.steps <= 1_000_000
        or not 2 <= config.batch <= MAX_INPUTS
        or not 1 <= config.samples <= MAX_INPUTS
    ):
        raise ConfigError(f"guidance_distill: steps >= 1, batch >= 2 and samples >= 1 (at most {MAX_INPUTS})")
    if config.lr <= 0 or config.max_seconds <= 0:
        raise ConfigError("guidance_distill: lr and max_seconds must be > 0")
    check_distribution_options("guidance_distill", config.max_fd_shift, config.check_samples)
    if not 0 <= config.max_steps <= 1_000_000:
        raise ConfigError("guidance_distill: max_steps must be in [0, 1000000] (0: steps)")


def check_program(config: Config, program: DiffusionProgram) -> None:
    if not uses_guidance(program.plan, program.spec.conditioning):
        raise ConfigError(
            "guidance_distill: the model's loop runs no classifier-free guidance (scale <= 1 or no unconditional"
            " branch), so there is nothing to fold in"
        )


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    scale = program.plan.guidance_scale
    teacher = denoiser_module(program)
    student_model = copy.deepcopy(program.denoiser).eval()
    student = denoiser_module(program.replace(denoiser=student_model))
    data = teacher_data(program, config.samples, DATA_SEED + ctx.seed, ctx.progress)
    steps = FirstOrder(program.plan, program.spec.prediction_type)
    timesteps = torch.tensor(grid(program.plan))
    trainer = Trainer(student_model, config.lr, config.steps, config.max_seconds)
    check = None
    if config.max_fd_shift:  # the original's distribution, sampled once
        check = ctx.distribution_check(config.check_samples)

    def loss(_step: int) -> torch.Tensor:
        rows = torch.randint(len(data.finals), (config.batch,), generator=ctx.rng)
        on_grid = timesteps[torch.randint(len(timesteps), (config.batch,), generator=ctx.rng)]
        anywhere = torch.randint(steps.train, (config.batch,), generator=ctx.rng).float()
        t = torch.where(torch.arange(config.batch) % 2 == 0, on_grid, anywhere)
        x0, batch = data.rows(rows)
        x = steps.noised(x0, torch.randn(x0.shape, generator=ctx.rng), t.tolist())
        x, t, batch = trainer.shard(x), trainer.shard(t), batch.rows(trainer.shard_rows(config.batch))
        with torch.no_grad():
            target = call(teacher, x, t, batch, scale)
        return trainer.normalized_mse(student.apply(x, t, batch.cond), target)

    plan = dataclasses.replace(program.plan, guidance_scale=1.0, guided_steps=None)
    result = program.replace(denoiser=student_model, plan=plan)
    log = train_checked(
        trainer,
        loss,
        ctx.progress,
        "guidance_distill: training",
        config.steps,
        config.max_steps,
        config.max_seconds,
        partial(check.shift, result) if check is not None else None,
        config.max_fd_shift,
    )
    decision = GuidanceDistillDecision(
        scale,
        log.steps,
        log.seconds,
        log.loss_first,
        log.loss_last,
        config.max_fd_shift,
        log.checks,
        check.floor if check is not None else None,
    )
    return PassResult(result, decision)


PASS = Pass(
    name="guidance_distill",
    phase=Phase.DISTILLATION,
    config=Config,
    run=run,
    budgets=frozenset({"steps"}),
    invalidates=frozenset({CALIBRATION, FLOPS}),
    new_reference=True,
    check=check,
    check_program=check_program,
    doc="classifier-free guidance folded into the network (one evaluation per step)",
)
