"""What the step-distillation passes share: the teacher's own samples as data, the (guided) model
call, the first-order step between any two timesteps, and a consistency student's grid and loop.

The first-order step is DDIM for DDPM-type schedules (Song et al. 2021, eq. 12, eta = 0) and Euler
for flow matching, for any prediction type. Unclipped it is affine in the model output, so a student's
one-step landing point is differentiable (Salimans & Ho 2022 train on its eq. 7 target; the loss on
the landing point is that loss reweighted per timestep).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.adapters import Denoiser
from core.errors import ConfigError
from core.grid_ddim import x0_and_eps
from core.ir import DiffusionProgram, SamplingPlan
from core.sampling import ConditionBatch, guide
from core.schedulers import build_scheduler, is_flow, with_scheduler
from core.variants import sample_program


@dataclass(frozen=True)
class TeacherData:
    """Final samples of the teacher's own loop (data-free distillation) and their condition tensors."""

    finals: torch.Tensor
    conditions: ConditionBatch

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, ConditionBatch]:
        return self.finals[rows], self.conditions.rows(rows)


def teacher_data(program: DiffusionProgram, samples: int, base_seed: int, progress=lambda it, **_: it) -> TeacherData:
    """`samples` finals of `program`'s loop on seeds base_seed.. (conditions cycling as in evaluation)."""
    from core.conditions import condition_set, encode

    seeds = list(range(base_seed, base_seed + samples))
    conditions = condition_set(program.spec.conditioning, program.stages, samples)
    chunks = []
    for start in progress(range(0, samples, 64), desc="distillation data", leave=False):
        part = slice(start, start + 64)
        chunks.append(sample_program(program, seeds[part], None if conditions is None else conditions[part]))
    return TeacherData(torch.cat(chunks), encode(program, conditions, samples))


def call(model: Denoiser, x: torch.Tensor, t: torch.Tensor, batch: ConditionBatch, scale: float) -> torch.Tensor:
    """The model's output for the loop step: classifier-free guided at `scale` when > 1 and the batch
    has an unconditional branch, else the conditional output alone."""
    if scale > 1.0 and batch.uncond is not None:
        out = model.apply(torch.cat([x, x]), torch.cat([t, t]), batch.guided())
        return guide(out, scale, True)
    return model.apply(x, t, batch.cond)


class FirstOrder:
    """DDIM (or flow-matching Euler) between any two timesteps of the plan's noise schedule, with the
    plan's x0 clipping where its sampler clips (DDIM's clip_sample)."""

    def __init__(self, plan: SamplingPlan, prediction_type: str) -> None:
        scheduler = build_scheduler(plan)
        self.flow = is_flow(plan)
        self.prediction_type = prediction_type
        self.train = scheduler.config.num_train_timesteps
        config = scheduler.config
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else None
        if not self.flow:
            if prediction_type not in ("epsilon", "sample", "v_prediction"):
                raise ConfigError(f"no DDIM step for prediction type {prediction_type!r}")
            self.cumprod = scheduler.alphas_cumprod.double()
            final = getattr(scheduler, "final_alpha_cumprod", None)
            self.final = float(final) if final is not None else 1.0

    def _alpha_sigma(self, t: float | None) -> tuple[float, float]:
        """(signal, noise) scales at timestep t (None: the end of sampling)."""
        if self.flow:
            s = 0.0 if t is None else t / self.train
            return 1.0 - s, s
        cumprod = self.final if t is None else self._cumprod(t)
        return cumprod**0.5, (1 - cumprod) ** 0.5

    def _cumprod(self, t: float) -> float:
        """alpha_bar at timestep t; between integer timesteps through sigma interpolated linearly, as the
        loop of a fractional grid (Euler's) feeds the model (core.noising.signal_and_noise)."""
        if t == round(t):
            return float(self.cumprod[round(t)])
        sigmas = ((1 - self.cumprod) / self.cumprod).sqrt().numpy()
        sigma = float(np.interp(t, np.arange(len(sigmas)), sigmas))
        return 1 / (1 + sigma * sigma)

    def _scales(self, ts: Sequence[float | None], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._alpha_sigma(None if t is None else float(t)) for t in ts]
        shape = (-1, *([1] * (like.dim() - 1)))
        alpha = torch.tensor([p[0] for p in pairs], dtype=like.dtype).view(shape)
        sigma = torch.tensor([p[1] for p in pairs], dtype=like.dtype).view(shape)
        return alpha, sigma

    def step(
        self, out: torch.Tensor, z: torch.Tensor, t: Sequence[float], t_next: Sequence[float | None], clip: bool = True
    ) -> torch.Tensor:
        """Per row: z at t[i] stepped to t_next[i] with the model output `out` (clip: the sampler's x0
        clipping; off, the step is affine in `out`, which is what a student is trained through)."""
        a0, s0 = self._scales(t, z)
        a1, s1 = self._scales(t_next, z)
        if self.flow:  # z = (1 - s) x0 + s noise, out = noise - x0
            return z + (s1 - s0) * out
        x0, eps = x0_and_eps(self.prediction_type, out, z, a0.square())
        if clip and self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return a1 * x0 + s1 * eps

    def x0(self, out: torch.Tensor, z: torch.Tensor, t: Sequence[float]) -> torch.Tensor:
        """Per row: the unclipped sample the output `out` predicts from z at timestep t[i] (DDPM-type schedules)."""
        if self.flow:
            raise ConfigError("a flow-matching plan's sample prediction is not a DDPM-type x0")
        alpha, _ = self._scales(t, z)
        return x0_and_eps(self.prediction_type, out, z, alpha.square())[0]

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: Sequence[float]) -> torch.Tensor:
        """x0 noised to timesteps t (the forward process)."""
        alpha, sigma = self._scales(t, x0)
        return alpha * x0 + sigma * noise


def grid(plan: SamplingPlan) -> list[float]:
    """The plan's timesteps, once each (a step that calls the model twice at one timestep, PNDM's warm-up
    or a second-order step, is one step of the grid)."""
    return list(dict.fromkeys(float(t) for t in build_scheduler(plan).timesteps))


MIN_SIGNAL = 1 / 32  # a consistency grid's points have a signal scale sqrt(alpha_bar) of at least this


def consistency_grid(plan: SamplingPlan, teacher_steps: int) -> list[int]:
    """The teacher ODE's grid for consistency distillation, ascending: LCM's (every train/N-th timestep, ending
    at T - 1) less its top points where the signal scale is under MIN_SIGNAL. There the sample an epsilon output
    predicts amplifies the network's error by 1/sqrt(alpha_bar): 2,000x at the last of LeRobot's 100 cosine
    timesteps (13x at the next grid point down; Stable Diffusion's last is 15x, where LCM trains)."""
    scheduler = build_scheduler(dataclasses.replace(plan, num_inference_steps=1, timesteps=None, warm_start=None))
    alphas = scheduler.alphas_cumprod
    gap = len(alphas) // teacher_steps
    return [t for t in (gap * (n + 1) - 1 for n in range(teacher_steps)) if float(alphas[t]) ** 0.5 >= MIN_SIGNAL]


def consistency_plan(plan: SamplingPlan, teacher_steps: int, sampling_steps: int) -> SamplingPlan:
    """The plan run by diffusers' LCMScheduler on `sampling_steps` of the consistency grid's points, evenly
    spaced from its top as LCM spaces them (the trained noise schedule kept)."""
    swapped = with_scheduler(plan, "LCMScheduler")
    swapped = dataclasses.replace(
        swapped, scheduler_config={**swapped.scheduler_config, "original_inference_steps": teacher_steps}
    )
    grid = consistency_grid(swapped, teacher_steps)[::-1]
    if len(grid) < sampling_steps:
        raise ConfigError(
            f"the consistency grid has {len(grid)} points with signal (sqrt(alpha_bar) >= {MIN_SIGNAL:g}),"
            f" fewer than {sampling_steps} sampling steps"
        )
    picked = np.floor(np.linspace(0, len(grid), sampling_steps, endpoint=False)).astype(int)
    timesteps = tuple(float(grid[i]) for i in picked)
    return dataclasses.replace(swapped, num_inference_steps=len(timesteps), timesteps=timesteps)
