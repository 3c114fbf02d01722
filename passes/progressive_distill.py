"""Progressive distillation (Salimans & Ho 2022): rounds that halve the steps, each student taking in
one DDIM step what its teacher takes in two.

Round r: the teacher runs DDIM on its grid; the student's grid is every other teacher timestep (the
highest-noise pairs merged first when a round only needs part of a halving, e.g. 5 -> 4 steps). A
training input is a teacher sample (data-free: the input program's own final samples) re-noised to a
student timestep; the target is where the teacher's two DDIM steps land, and the loss is the distance
between the student's one-step landing point and it (eq. 7's target, expressed for any prediction
type through the step's affine form, core.distill.FirstOrder). The student of a round is the
teacher of the next. Under classifier-free guidance both run guided at the plan's scale (better:
run guidance_distill first, as Meng et al. 2023 do). The result runs DDIM on the final grid
(core.grid_ddim) and becomes the reference of later passes.

With `max_fd_shift`, every round's student is judged as the verification judges the result
(verify.floor_check: its samples' distribution shift from the original, in the original denoiser's
features): rounds stop at the first student over the bound and the last one
within it is kept (none: the pass refuses). With `max_round_steps` a round over the bound trains on
first, in chunks of `round_steps` (each a cosine warm restart, core.training.train_checked), checked
after each. Measured on dit-digits (BENCHMARKS.md): its rounds add little (1.63 to 1.65 of the floor,
the former FD ratio), the guidance-distilled network they started from was at 1.60.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from core import seeds
from core.adapters import denoiser_module
from core.distill import FirstOrder, TeacherData, call, grid, teacher_data
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from core.schedulers import check_plan, on_grid
from core.training import CheckedLog, Trainer, train_checked
from passes.analyses import CALIBRATION, FLOPS
from passes.base import Context, Pass, PassResult, Phase, check_distribution_options

DATA_SEED = seeds.PROGRESSIVE_DISTILL  # the teacher's samples, + the run's --seed (core.seeds)


@dataclass
class Config:
    sampling_steps: int = 4  # the student's step count at the end (rounds halve until there)
    round_steps: int = 800  # training steps per round
    batch: int = 32
    lr: float = 2e-4
    samples: int = 256  # teacher samples re-noised as training inputs
    max_seconds: float = 1800.0  # for all rounds; each round gets an equal share of what is left
    max_fd_shift: float = 0.0  # a round's student must keep this distribution shift (0: not checked)
    check_samples: int = 100  # samples of the distribution check (its seed-to-seed noise shrinks with more)
    max_round_steps: int = 0  # with max_fd_shift: a round trains on in chunks of round_steps up to this (0: one)
    # `steps` counts training steps in every pass; this pass's loop step count is `sampling_steps` (issue 34).
    RENAMED: ClassVar[dict[str, str]] = {"steps": "sampling_steps"}


@dataclass(frozen=True)
class ProgressiveDecision(Decision):
    rounds: list[dict]  # per round: steps before -> after, training steps, seconds, loss first/last, distribution shift
    timesteps: list[float]
    max_fd_shift: float = 0.0
    floor_fd: float | None = None  # the original's own distance to the check's floor set

    title = "Progressive distillation"

    def markdown(self) -> list[str]:
        lines = [f"Final grid: {len(self.timesteps)} DDIM steps at timesteps {[round(t) for t in self.timesteps]}."]
        if self.max_fd_shift:
            kept = sum(1 for r in self.rounds if r.get("kept", True))
            lines.append(
                f"Each round's student judged on the distribution check's seeds (the distribution shift;"
                f" the original's own FD to the floor set {self.floor_fd:.4g}; bound {self.max_fd_shift:g}): {kept} of"
                f" {len(self.rounds)} rounds kept."
            )
        lines += [
            "",
            "| round | steps | training steps | seconds | landing-point loss first -> last | distribution | kept |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.rounds):
            shift = "-" if r.get("fd_shift") is None else f"{r['fd_shift']:.3g}"
            lines.append(
                f"| {i + 1} | {r['teacher_steps']} -> {r['student_steps']} | {r['steps']} | {r['seconds']} |"
                f" {r['loss_first']} -> {r['loss_last']} | {shift} | {'yes' if r.get('kept', True) else 'no'} |"
            )
        return lines


def check(config: Config, capabilities: frozenset[str]) -> None:
    if not 1 <= config.sampling_steps <= 1000 or not 1 <= config.round_steps <= 1_000_000:
        raise ConfigError("progressive_distill: sampling_steps must be in [1, 1000] and round_steps >= 1")
    if not 2 <= config.batch <= MAX_INPUTS or not 1 <= config.samples <= MAX_INPUTS:
        raise ConfigError(f"progressive_distill: batch >= 2 and samples >= 1 (at most {MAX_INPUTS})")
    if config.lr <= 0 or config.max_seconds <= 0:
        raise ConfigError("progressive_distill: lr and max_seconds must be > 0")
    check_distribution_options("progressive_distill", config.max_fd_shift, config.check_samples)
    if not 0 <= config.max_round_steps <= 1_000_000:
        raise ConfigError("progressive_distill: max_round_steps must be in [0, 1000000] (0: round_steps)")


def check_program(config: Config, program: DiffusionProgram) -> None:
    if config.sampling_steps >= len(grid(program.plan)):
        raise ConfigError(
            f"progressive_distill: {config.sampling_steps} steps is not fewer than the loop's {len(grid(program.plan))}"
        )
    FirstOrder(program.plan, program.spec.prediction_type)
    check_plan(on_grid(program.plan, "ddim" if program.spec.prediction_type != "flow" else "euler", grid(program.plan)))


def rounds(start: int, end: int) -> list[list[int]]:
    """Per round, the student's group sizes over the teacher's steps (2: merged, 1: kept), halving
    from `start` until `end` steps; the high-noise pairs merge first."""
    plan, n = [], start
    while n > end:
        target = max(end, (n + 1) // 2)
        merged = n - target
        plan.append([2] * merged + [1] * (n - 2 * merged))
        n = target
    return plan


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    data = teacher_data(program, config.samples, DATA_SEED + ctx.seed, ctx.progress)
    check = None
    if config.max_fd_shift:  # the original's distribution, sampled once
        check = ctx.distribution_check(config.check_samples)
    teacher_model, teacher_grid = program.denoiser, grid(program.plan)
    kept_model, kept_grid, records, start = program.denoiser, teacher_grid, [], time.perf_counter()
    schedule = rounds(len(teacher_grid), config.sampling_steps)
    for i, groups in enumerate(schedule):
        left = config.max_seconds - (time.perf_counter() - start)
        budget = max(1.0, left / (len(schedule) - i))
        student_model, train, student_grid = _round(program, teacher_model, teacher_grid, groups, config, ctx, data)
        judged = _student(program, student_model, student_grid)  # its network is trained in place
        log = train(
            config.round_steps,
            config.max_round_steps,
            budget,
            check and partial(check.shift, judged),
            config.max_fd_shift,
        )
        record = {
            "teacher_steps": len(teacher_grid),
            "student_steps": len(groups),
            "steps": log.steps,
            "seconds": log.seconds,
            "loss_first": log.loss_first,
            "loss_last": log.loss_last,
            "fd_shift": log.shift,
            "checks": log.checks,
            "kept": log.shift is None or log.shift <= config.max_fd_shift,
        }
        records.append(record)
        if not record["kept"]:
            break
        teacher_model, teacher_grid = kept_model, kept_grid = student_model, student_grid
    if kept_model is program.denoiser:
        raise ConfigError(
            f"progressive_distill: no student kept the distribution (shift {records[0]['fd_shift']:.3g} after"
            f" {records[0]['teacher_steps']} -> {records[0]['student_steps']} steps, bound {config.max_fd_shift:g})"
        )
    decision = ProgressiveDecision(records, kept_grid, config.max_fd_shift, None if check is None else check.floor)
    return PassResult(_student(program, kept_model, kept_grid), decision)


def _student(program: DiffusionProgram, model: nn.Module, timesteps: list[float]) -> DiffusionProgram:
    """The program of a student: its network on its DDIM grid. It learned unclipped steps (it lands where
    the clipping teacher lands): it samples unclipped. (Measured on dit-digits: its 4-step student is at
    1.66 of the floor sampled with the teacher's clipping, 1.67 without, the former FD ratio.)"""
    solver = "euler" if program.spec.prediction_type == "flow" else "ddim"
    plan = on_grid(program.plan, solver, timesteps)
    if "clip_sample" in plan.scheduler_config or solver == "ddim":
        plan = dataclasses.replace(plan, scheduler_config={**plan.scheduler_config, "clip_sample": False})
    return program.replace(denoiser=model, plan=plan)


def _round(
    program: DiffusionProgram,
    teacher_model: nn.Module,
    teacher_grid: list[float],
    groups: list[int],
    config: Config,
    ctx: Context,
    data: TeacherData,
) -> tuple[nn.Module, Callable[..., CheckedLog], list[float]]:
    """One round: a copy of the teacher, and its training (core.training.train_checked, given the chunk,
    the total steps, the seconds, the judge and the bound) to take each group of its teacher's steps at once."""
    starts = [sum(groups[:j]) for j in range(len(groups))]
    ends = [s + g for s, g in zip(starts, groups, strict=True)]
    full = [*teacher_grid, None]  # None: the end of sampling
    student_grid = [teacher_grid[s] for s in starts]
    teacher = denoiser_module(program.replace(denoiser=teacher_model))
    student_model = copy.deepcopy(teacher_model).eval()
    student = denoiser_module(program.replace(denoiser=student_model))
    steps = FirstOrder(program.plan, program.spec.prediction_type)
    scale = program.plan.guidance_scale
    trainer = Trainer(student_model, config.lr, config.round_steps, 1.0)  # restarted per chunk (train_checked)

    def loss(_step: int) -> torch.Tensor:
        rows = torch.randint(len(data.finals), (config.batch,), generator=ctx.rng)
        which = torch.randint(len(groups), (config.batch,), generator=ctx.rng)
        x0, batch = data.rows(rows)
        t = torch.tensor([student_grid[j] for j in which])
        z = steps.noised(x0, torch.randn(x0.shape, generator=ctx.rng), t.tolist())
        shard = trainer.shard_rows(config.batch)
        z, t, which, batch = z[shard], t[shard], which[shard], batch.rows(shard)
        with torch.no_grad():  # the teacher's steps over each row's group, with the sampler's clipping
            landing, k = z, torch.tensor([starts[j] for j in which])
            stop = torch.tensor([ends[j] for j in which])
            for _ in range(max(groups)):
                active = k < stop
                at = torch.minimum(k, stop - 1)  # finished rows repeat a step whose result is discarded
                tk = [full[i] for i in at]
                moved = steps.step(
                    call(teacher, landing, torch.tensor(tk), batch, scale), landing, tk, [full[i + 1] for i in at]
                )
                landing = torch.where(active.view(-1, *[1] * (z.dim() - 1)), moved, landing)
                k = torch.where(active, k + 1, k)
        end = [full[ends[j]] for j in which]
        landed = steps.step(call(student, z, t, batch, scale), z, t.tolist(), end, clip=False)
        return trainer.normalized_mse(landed, landing)

    desc = f"progressive_distill: {len(teacher_grid)} -> {len(groups)} steps, training"
    return student_model, partial(train_checked, trainer, loss, ctx.progress, desc), student_grid


PASS = Pass(
    name="progressive_distill",
    phase=Phase.DISTILLATION,
    config=Config,
    run=run,
    budgets=frozenset({"round_steps"}),
    invalidates=frozenset({CALIBRATION, FLOPS}),
    new_reference=True,
    check=check,
    check_program=check_program,
    doc="progressive distillation: rounds halving the steps (DDIM student)",
)
