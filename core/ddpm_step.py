"""diffusers' DDPMScheduler step (Ho et al. 2020, eq. 7 and the posterior variance of eq. 6), its per-step
scalars computed once per plan. A policy runs a short DDPM loop per control decision, where diffusers' step
costs about half a millisecond of 0-dim tensor arithmetic per step on CPU and building the scheduler about one
more: a warm-started decision of 6 steps spent about a quarter of its time there (BENCHMARKS.md, issue 35).

The scalars are diffusers' own float32 expressions on the scheduler's own tensors (`previous_timestep`,
`alphas_cumprod`, `_get_variance`), applied in the same order, so each step equals `DDPMScheduler.step` bit
for bit (tests/core/test_ddpm_step.py); the noise is drawn as diffusers' `randn_tensor` draws it from a list of
per-sample generators. Only the configurations it reproduces take it (DDPMScheduler, fixed variance types,
clipping or none, no thresholding); every other plan runs diffusers' step."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
from collections.abc import Iterator, Sequence

import torch

from core.ir import SamplingPlan
from core.schedulers import build_scheduler

VARIANCES = ("fixed_small", "fixed_large")  # `_get_variance(t) ** 0.5` scales the noise (diffusers' default branch)
_DIFFUSERS_ONLY = contextvars.ContextVar("diffusers_only", default=False)


@contextlib.contextmanager
def diffusers_steps() -> Iterator[None]:
    """Loops inside run diffusers' own DDPM step: a baseline timed as its users run it (LeRobot's select_action)."""
    token = _DIFFUSERS_ONLY.set(True)
    try:
        yield
    finally:
        _DIFFUSERS_ONLY.reset(token)


@dataclasses.dataclass(frozen=True)
class Scalars:
    sqrt_alpha: torch.Tensor  # alpha_prod_t ** 0.5
    sqrt_beta: torch.Tensor  # beta_prod_t ** 0.5
    x0_coeff: torch.Tensor  # pred_original_sample_coeff
    sample_coeff: torch.Tensor  # current_sample_coeff
    sigma: torch.Tensor | None  # _get_variance(t) ** 0.5; None at t = 0 (no noise drawn)


@dataclasses.dataclass(frozen=True)
class DdpmSteps:
    timesteps: torch.Tensor
    prediction_type: str
    clip: float | None
    scalars: tuple[Scalars, ...]

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Step i of the loop: `DDPMScheduler.step(out, timesteps[i], x, generator=generators).prev_sample`."""
        s = self.scalars[i]
        if self.prediction_type == "epsilon":
            x0 = (x - s.sqrt_beta * out) / s.sqrt_alpha
        elif self.prediction_type == "sample":
            x0 = out
        else:  # v_prediction
            x0 = s.sqrt_alpha * x - s.sqrt_beta * out
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        prev = s.x0_coeff * x0 + s.sample_coeff * x
        if s.sigma is None:  # the last step: no noise
            return prev
        shape = (1, *out.shape[1:])
        if len(generators) == 1:
            noise = torch.randn(out.shape, generator=generators[0], dtype=out.dtype)
        else:
            noise = torch.cat([torch.randn(shape, generator=g, dtype=out.dtype) for g in generators])
        return prev + s.sigma * noise.to(out.device)


def ddpm_steps(plan: SamplingPlan) -> DdpmSteps | None:
    """The plan's steps with their scalars, or None when diffusers' own step must run it."""
    if plan.scheduler_class != "DDPMScheduler" or _DIFFUSERS_ONLY.get():
        return None
    try:
        key = json.dumps(plan.to_dict(), sort_keys=True)
    except (TypeError, ValueError):  # a config that is not plain JSON: diffusers' step
        return None
    return _steps(key)


@functools.lru_cache(maxsize=64)
def _steps(key: str) -> DdpmSteps | None:
    scheduler = build_scheduler(SamplingPlan.from_dict(json.loads(key)))
    config = scheduler.config
    if config.thresholding or scheduler.variance_type not in VARIANCES:
        return None
    if config.prediction_type not in ("epsilon", "sample", "v_prediction"):
        return None
    scalars = []
    for t in scheduler.timesteps:
        prev_t = scheduler.previous_timestep(t)
        alpha_prod_t = scheduler.alphas_cumprod[t]
        alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        sigma = scheduler._get_variance(t) ** 0.5 if t > 0 else None
        scalars.append(
            Scalars(
                sqrt_alpha=alpha_prod_t ** (0.5),
                sqrt_beta=beta_prod_t ** (0.5),
                x0_coeff=(alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t,
                sample_coeff=current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t,
                sigma=sigma,
            )
        )
    clip = float(config.clip_sample_range) if config.clip_sample else None
    return DdpmSteps(scheduler.timesteps.clone(), config.prediction_type, clip, tuple(scalars))
