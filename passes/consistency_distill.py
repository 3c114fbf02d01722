"""Consistency distillation (Song et al. 2023, Algorithm 2; in the latent-consistency form of Luo et al. 2023,
as Consistency Policy, Prasad et al. 2024, does for policies): a student that maps any point of the teacher's
probability-flow ODE to the ODE's end in one evaluation, sampled in a few steps with fresh noise between them.

The student is the teacher's network with the skip parametrization of diffusers' LCMScheduler,
f(z, t) = c_skip(t) z + c_out(t) x0(z, t), where x0 is the sample the network's output predicts (exact at
t = 0: c_skip = 1, c_out = 0). A training input is a teacher sample (data-free: the input program's own final
samples) noised to a timestep t of the teacher's ODE grid (LCM's `original_inference_steps` grid: every
train/N-th timestep); the teacher takes one DDIM step from t to the grid point below it, and the loss is the
distance between the student at (z, t) and a target network at the teacher's landing point: the target is an
exponential moving average of the student (Song et al.'s theta^-; LCM's decay 0.95), never trained directly.

The result samples with diffusers' LCMScheduler (multistep consistency sampling: denoise, re-noise to the next
timestep with fresh noise, denoise) on `sampling_steps` of the grid's timesteps (a custom grid when its top
was left out: the loop starts from noise there), and becomes the reference of later passes. A policy's warm
start (passes/warm_start) runs on it unchanged: its later decisions re-noise the previous chunk to a grid
timestep and run the consistency steps at or below it. Measured on the PushT references (BENCHMARKS.md, issue 35
part 5): at 3,000 steps on 2 cores its 1-4-step students lost both policies' task (2-18% against 64-69%), so no
shipped recipe uses it yet.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from core import seeds
from core.adapters import Denoiser, denoiser_module
from core.distill import FirstOrder, call, consistency_grid, consistency_plan, teacher_data
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from core.sampling import ConditionBatch
from core.schedulers import build_scheduler, is_flow
from core.training import Trainer
from passes.analyses import CALIBRATION, FLOPS
from passes.base import Context, Pass, PassResult, Phase

DATA_SEED = seeds.CONSISTENCY_DISTILL  # the teacher's samples, + the run's --seed (core.seeds)


@dataclass
class Config:
    sampling_steps: int = 2  # the student's loop: consistency steps per sample
    teacher_steps: int = 20  # the teacher ODE's grid (LCM's original_inference_steps): one DDIM step per grid gap
    steps: int = 3000  # training steps
    batch: int = 64
    lr: float = 1e-4
    target_decay: float = 0.95  # the target network: an EMA of the student (LCM's 0.95; 0: the student itself)
    samples: int = 1024  # teacher samples noised as training inputs
    max_seconds: float = 1800.0


@dataclass(frozen=True)
class ConsistencyDecision(Decision):
    teacher_steps: int
    timesteps: list[float]
    steps: int
    seconds: float
    loss_first: float
    loss_last: float

    title = "Consistency distillation"

    def markdown(self) -> list[str]:
        return [
            f"A consistency student of the teacher's ODE on its {self.teacher_steps}-step DDIM grid, sampled by"
            f" diffusers' LCMScheduler in {len(self.timesteps)} steps at timesteps"
            f" {[round(t) for t in self.timesteps]}.",
            f"Training: {self.steps} steps in {self.seconds:g} s; consistency loss"
            f" {self.loss_first} -> {self.loss_last}.",
        ]


def check(config: Config, capabilities: frozenset[str]) -> None:
    if not 1 <= config.sampling_steps <= config.teacher_steps <= 1000:
        raise ConfigError("consistency_distill: need 1 <= sampling_steps <= teacher_steps <= 1000")
    if not 1 <= config.steps <= 1_000_000 or not 2 <= config.batch <= MAX_INPUTS:
        raise ConfigError(f"consistency_distill: steps >= 1 and batch in [2, {MAX_INPUTS}]")
    if not 1 <= config.samples <= MAX_INPUTS or config.lr <= 0 or config.max_seconds <= 0:
        raise ConfigError(f"consistency_distill: samples in [1, {MAX_INPUTS}], lr and max_seconds > 0")
    if not 0.0 <= config.target_decay < 1.0:
        raise ConfigError("consistency_distill: target_decay must be in [0, 1)")


def check_program(config: Config, program: DiffusionProgram) -> None:
    if is_flow(program.plan):
        raise ConfigError("consistency_distill: needs a DDPM-type noise schedule (not flow matching)")
    train = program.plan.scheduler_config.get("num_train_timesteps", 1000)
    if train % config.teacher_steps:
        raise ConfigError(f"consistency_distill: teacher_steps must divide the {train} train timesteps")
    build_scheduler(consistency_plan(program.plan, config.teacher_steps, config.sampling_steps))
    FirstOrder(program.plan, program.spec.prediction_type)


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    data = teacher_data(program, config.samples, DATA_SEED + ctx.seed, ctx.progress)
    plan = consistency_plan(program.plan, config.teacher_steps, config.sampling_steps)
    lcm = build_scheduler(plan)
    grid = consistency_grid(plan, config.teacher_steps)  # contiguous from its bottom: grid[i - 1] is below grid[i]
    steps = FirstOrder(program.plan, program.spec.prediction_type)
    teacher = denoiser_module(program)
    student_model = copy.deepcopy(program.denoiser).eval()
    target_model = copy.deepcopy(program.denoiser).eval()
    student = denoiser_module(program.replace(denoiser=student_model))
    target = denoiser_module(program.replace(denoiser=target_model))
    scale = program.plan.guidance_scale
    trainer = Trainer(student_model, config.lr, config.steps, config.max_seconds)

    def consistent(model: Denoiser, z: torch.Tensor, t: list[float], batch: ConditionBatch) -> torch.Tensor:
        """f(z, t) = c_skip z + c_out x0: the LCM scheduler's own boundary scalings (sampling reads the same)."""
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(t, dtype=torch.float64))
        shape = (-1, *[1] * (z.dim() - 1))
        x0 = steps.x0(call(model, z, torch.tensor(t), batch, scale), z, t)
        return c_skip.to(z.dtype).view(shape) * z + c_out.to(z.dtype).view(shape) * x0

    def loss(_step: int) -> torch.Tensor:
        _ema(target_model, student_model, config.target_decay)  # the target after the previous step's update
        rows = torch.randint(len(data.finals), (config.batch,), generator=ctx.rng)
        index = torch.randint(len(grid), (config.batch,), generator=ctx.rng)
        x0, batch = data.rows(rows)
        t = [float(grid[i]) for i in index]
        below = [float(grid[i - 1]) if i else 0.0 for i in index]  # the bottom point steps to 0
        z = steps.noised(x0, torch.randn(x0.shape, generator=ctx.rng), t)
        shard = trainer.shard_rows(config.batch)
        z, batch = z[shard], batch.rows(shard)
        t, below = [t[i] for i in shard], [below[i] for i in shard]
        with torch.no_grad():  # the teacher's DDIM step down the grid (its sampler's clipping), the target there
            landed = steps.step(call(teacher, z, torch.tensor(t), batch, scale), z, t, below)
            wanted = consistent(target, landed, below, batch)
        return trainer.normalized_mse(consistent(student, z, t, batch), wanted)

    log = trainer.run(loss, ctx.progress, f"consistency_distill: {config.teacher_steps}-step ODE, training")
    first, last = log.first_last()
    timesteps = [float(t) for t in lcm.timesteps]
    decision = ConsistencyDecision(config.teacher_steps, timesteps, log.steps, log.seconds, first, last)
    return PassResult(program.replace(denoiser=student_model, plan=plan), decision)


@torch.no_grad()
def _ema(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    for p, q in zip(target.parameters(), online.parameters(), strict=True):
        p.lerp_(q, 1.0 - decay)


PASS = Pass(
    name="consistency_distill",
    phase=Phase.DISTILLATION,
    config=Config,
    run=run,
    budgets=frozenset({"steps"}),
    invalidates=frozenset({CALIBRATION, FLOPS}),
    new_reference=True,
    check=check,
    check_program=check_program,
    doc="consistency distillation: a few-step student of the teacher's ODE (LCM sampler)",
)
