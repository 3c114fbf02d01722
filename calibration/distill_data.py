"""Data-free distillation (the recover and linearize passes): each batch mixes loop inputs (the exact
(x_t, t, condition) the plan's loop feeds the model, null condition included) from the calibration
trajectories and from `teacher_samples` fresh trajectories of the reference on their own seeds, with
those trajectories' final samples re-noised at random training timesteps; `distill` trains on them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from calibration import capture as calib
from calibration import selection
from calibration.capture import Trajectories, evaluation_set
from core import seeds
from core.adapters import denoiser_module
from core.ir import DiffusionProgram
from core.noising import add_noise
from core.schedulers import build_scheduler
from core.training import FeatureHooks, Trainer, TrainLog, distillation_loss

TEACHER_SEED = seeds.TEACHER  # fresh trajectories, + the run's --seed (core.seeds)

Batch = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class DistillationData:
    pool: selection.CalibrationInputs
    finals: torch.Tensor
    final_cond: dict[str, torch.Tensor]
    scheduler: Any
    names: tuple[str, ...]

    @classmethod
    def build(
        cls,
        reference: DiffusionProgram,
        calibration: Trajectories,
        samples: int,
        teacher_samples: int,
        rng: torch.Generator,
        seed: int = 0,
    ) -> DistillationData:
        """`samples` loop inputs (timestep-stratified, shared by the trajectories in proportion to their
        seeds) and every trajectory's final samples."""
        scheduler = build_scheduler(reference.plan)
        train_steps = scheduler.config.num_train_timesteps
        trajectories = [calibration]
        if teacher_samples:
            seeds, conditions = evaluation_set(reference, teacher_samples, TEACHER_SEED + seed)
            trajectories.append(calib.capture(reference, seeds, conditions))
        total = sum(len(t.seeds) for t in trajectories)
        num_classes = reference.spec.conditioning.num_classes
        pool = selection.CalibrationInputs.concat(
            [
                selection.select(t, "timestep", max(1, samples * len(t.seeds) // total), rng, train_steps, num_classes)
                for t in trajectories
            ]
        )
        names = reference.spec.conditioning.input_names
        # The conditional rows of each capture: a final sample's own condition tensors.
        final_cond = {k: torch.cat([t.cond[k][: len(t.seeds)] for t in trajectories]) for k in names}
        return cls(pool, torch.cat([t.final for t in trajectories]), final_cond, scheduler, tuple(names))

    def batch(self, size: int, rng: torch.Generator) -> Batch:
        """One global batch (the same on every rank): half loop inputs, half re-noised final samples."""
        half = size // 2
        x, t, cond = self.pool.rows(torch.randint(self.pool.x.shape[0], (half,), generator=rng))
        rows = torch.randint(self.finals.shape[0], (size - half,), generator=rng)
        steps = torch.randint(self.scheduler.config.num_train_timesteps, (len(rows),), generator=rng)
        finals = self.finals[rows]
        noisy = add_noise(self.scheduler, finals, torch.randn(finals.shape, generator=rng), steps)
        x, t = torch.cat([x, noisy]), torch.cat([t, steps.float()])
        return x, t, tuple(torch.cat([cond[k], self.final_cond[k][rows]]) for k in self.names)


class DistillConfig(Protocol):
    """The config fields the distilling passes share."""

    steps: int
    batch: int
    lr: float
    feature_weight: float
    max_seconds: float
    samples: int
    teacher_samples: int


def distill(
    student: Callable[..., torch.Tensor],
    trainable: nn.Module,
    pairs: list[tuple[nn.Module, nn.Module]],
    reference: DiffusionProgram,
    calibration: Trajectories,
    config: DistillConfig,
    rng: torch.Generator,
    progress: Callable[..., Iterable],
    desc: str,
    seed: int = 0,
) -> TrainLog:
    """Train `trainable`'s parameters so that `student` matches the reference's network on
    DistillationData batches: output loss plus `config.feature_weight` x the (student, teacher) module
    pairs' output loss (core.training.distillation_loss). `seed`: the run's --seed (teacher samples' family)."""
    teacher = denoiser_module(reference)
    data = DistillationData.build(reference, calibration, config.samples, config.teacher_samples, rng, seed)
    trainer = Trainer(trainable, config.lr, config.steps, config.max_seconds)
    with FeatureHooks(pairs, trainer.normalized_mse) as features:

        def loss(_step: int) -> torch.Tensor:
            batch = data.batch(config.batch, rng)
            return distillation_loss(trainer, features, teacher, student, batch, config.feature_weight)

        return trainer.run(loss, progress, desc)
