"""Recovery after pruning / layer removal: a short distillation from the original denoiser.

Data-free: each batch mixes loop inputs (the exact (x_t, t, class) the plan's loop feeds the model,
null class included) from the calibration trajectories and from `teacher_samples` fresh trajectories
of the original on their own seeds, with those trajectories' final samples re-noised at random
training timesteps. Loss: the student's output vs the teacher's, plus normalized feature distillation on the
blocks that survived (student block j vs the teacher block it came from; layer_removal records the
map), each term divided by the teacher's energy so the terms are scale-free. Stops at `steps` or
`max_seconds`, whichever comes first; the pass records the loss before and after. Data-parallel
under torchrun (core.training).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from calibration import capture as calib
from calibration import selection
from calibration.capture import evaluation_set
from core.adapters import denoiser_module, respec
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from core.sampling import add_noise, build_scheduler
from core.training import Trainer
from passes.base import Context, Pass, PassResult, Phase

TEACHER_SEED = 20_000  # fresh trajectories: disjoint from evaluation (0..) and calibration (10 000..)


@dataclass
class Config:
    steps: int = 600
    batch: int = 64
    lr: float = 3e-4
    feature_weight: float = 0.5  # weight of the normalized feature term (0: output only)
    max_seconds: float = 900.0
    samples: int = 4096  # loop inputs in the pool (timestep-stratified)
    teacher_samples: int = 256  # fresh trajectories of the original (0: the calibration set only)


@dataclass(frozen=True)
class RecoverDecision(Decision):
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    feature_pairs: int

    title = "Recovery distillation"

    def markdown(self) -> list[str]:
        return [
            f"- {self.steps} steps in {self.seconds} s; distillation loss {self.loss_first} -> {self.loss_last}"
            f" (output + {self.feature_pairs} block features); fidelity before and after: see Passes"
        ]


def check(config: Config, capabilities: frozenset[str]) -> None:
    counts = (config.batch, config.samples, config.teacher_samples + 1)
    if not 1 <= config.steps <= 1_000_000 or config.batch < 2 or not all(1 <= c <= MAX_INPUTS for c in counts):
        raise ConfigError(
            f"recover: steps >= 1 (at most 1000000), batch >= 2, samples >= 1 and teacher_samples >= 0 "
            f"(batch and samples at most {MAX_INPUTS})"
        )
    if config.lr <= 0 or config.feature_weight < 0 or config.max_seconds <= 0:
        raise ConfigError("recover: lr and max_seconds must be > 0, feature_weight >= 0")


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    teacher_program = ctx.reference
    # The student stays in eval mode: train-mode regularizers (dropout, DiT's 10% class-label
    # dropout) would make it fit the teacher on inputs the teacher never saw.
    student_model = copy.deepcopy(program.denoiser).eval()
    student = denoiser_module(program.replace(denoiser=student_model))
    teacher = denoiser_module(teacher_program)
    pairs = _feature_pairs(program.replace(denoiser=student_model), teacher_program)
    scheduler = build_scheduler(program.plan)
    train_steps = scheduler.config.num_train_timesteps
    num_classes = program.spec.conditioning.num_classes
    trajectories = [ctx.calibration]
    if config.teacher_samples:
        seeds, conditions = evaluation_set(teacher_program, config.teacher_samples, TEACHER_SEED)
        trajectories.append(calib.capture(teacher_program, seeds, conditions))
    share = [config.samples * len(t.seeds) // sum(len(u.seeds) for u in trajectories) for t in trajectories]
    pool = selection.CalibrationInputs.concat(
        [
            selection.select(t, "timestep", max(1, k), ctx.rng, train_steps, num_classes)
            for t, k in zip(trajectories, share, strict=True)
        ]
    )
    finals = torch.cat([t.final for t in trajectories])
    # The conditional rows of each capture: a final sample's own condition tensors.
    final_cond = {
        k: torch.cat([t.cond[k][: len(t.seeds)] for t in trajectories]) for k in program.spec.conditioning.input_names
    }
    trainer = Trainer(student_model, config.lr, config.steps, config.max_seconds)
    names = program.spec.conditioning.input_names

    def batch() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """One global batch (the same on every rank): half loop inputs, half re-noised final samples."""
        half = config.batch // 2
        x, t, cond = pool.rows(torch.randint(pool.x.shape[0], (half,), generator=ctx.rng))
        rows = torch.randint(finals.shape[0], (config.batch - half,), generator=ctx.rng)
        steps = torch.randint(train_steps, (len(rows),), generator=ctx.rng)
        noisy = add_noise(scheduler, finals[rows], torch.randn(finals[rows].shape, generator=ctx.rng), steps)
        x, t = torch.cat([x, noisy]), torch.cat([t, steps.float()])
        return x, t, tuple(torch.cat([cond[k], final_cond[k][rows]]) for k in names)

    with _Features(pairs, trainer.normalized_mse) as features:

        def loss(_step: int) -> torch.Tensor:
            x, t, conds = batch()
            x, t, conds = trainer.shard(x), trainer.shard(t), tuple(trainer.shard(c) for c in conds)
            features.clear()
            with torch.no_grad():
                features.capture = "teacher"
                target = teacher(x, t, *conds)
            features.capture = "student"
            value = trainer.normalized_mse(student(x, t, *conds), target)
            if config.feature_weight and pairs:
                value = value + config.feature_weight * features.loss()
            return value

        log = trainer.run(loss, ctx.progress, "recover: distilling")
    first, last = log.first_last()
    decision = RecoverDecision(
        steps=log.steps, seconds=log.seconds, loss_first=first, loss_last=last, feature_pairs=len(pairs)
    )
    return PassResult(respec(program, student_model), decision)


def _feature_pairs(program: DiffusionProgram, teacher: DiffusionProgram) -> list[tuple[nn.Module, nn.Module]]:
    """(student block, teacher block) pairs: the blocks that survived, matched by original index."""
    student_blocks = [program.denoiser.get_submodule(b) for b in program.spec.blocks]
    teacher_blocks = [teacher.denoiser.get_submodule(b) for b in teacher.spec.blocks]
    origin = program.spec.origins()
    if len(origin) != len(student_blocks) or max(origin, default=-1) >= len(teacher_blocks):
        return []  # an unknown structural change: distil on the output alone
    return [(s, teacher_blocks[k]) for s, k in zip(student_blocks, origin, strict=True)]


class _Features:
    """Forward hooks that record each paired block's output, teacher's then student's."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]], mse: Callable[..., torch.Tensor]) -> None:
        self.pairs, self.capture, self.mse = pairs, "teacher", mse
        self.outputs: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
        self.handles: list = []

    def __enter__(self) -> _Features:
        for role, index in (("student", 0), ("teacher", 1)):
            for pair in self.pairs:
                self.handles.append(pair[index].register_forward_hook(self._record(role)))
        return self

    def _record(self, role: str):
        def hook(_module, _args, output):
            if self.capture == role:
                self.outputs[role].append(output[0] if isinstance(output, tuple) else output)

        return hook

    def clear(self) -> None:
        self.outputs = {"teacher": [], "student": []}

    def loss(self) -> torch.Tensor:
        pairs = zip(self.outputs["student"], self.outputs["teacher"], strict=True)
        return torch.stack([self.mse(s, t) for s, t in pairs]).mean()

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


PASS = Pass(
    name="recover",
    phase=Phase.RECOVERY,
    config=Config,
    run=run,
    budgets=frozenset({"steps"}),
    needs_earlier=frozenset({Phase.STRUCTURE}),  # nothing to recover otherwise
    check=check,
)
