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
from dataclasses import dataclass

from torch import nn

from calibration.distill_data import distill
from core.adapters import denoiser_module, respec
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from passes.base import Context, Pass, PassResult, Phase


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
    pairs = _feature_pairs(program.replace(denoiser=student_model), teacher_program)
    log = distill(
        student,
        student_model,
        pairs,
        teacher_program,
        ctx.calibration,
        config,
        ctx.rng,
        ctx.progress,
        "recover: distilling",
        seed=ctx.seed,
    )
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


PASS = Pass(
    name="recover",
    phase=Phase.RECOVERY,
    config=Config,
    run=run,
    budgets=frozenset({"steps"}),
    needs_earlier=frozenset({Phase.STRUCTURE}),  # nothing to recover otherwise
    check=check,
)
