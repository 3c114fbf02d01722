"""Forward noising as training and pruning need it: a sample noised to the plan's own timesteps or sigmas
(never cast to integers) and the training target of the prediction type, for any diffusers scheduler."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def signal_and_noise(scheduler: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) per timestep (train-timestep units, any real value): the model's input at t is a x0 + s noise.

    DDPM-type schedules: a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar), whether the loop keeps x in that
    form (DDPM, DDIM, PNDM, DPM-Solver) or in sigma form and scales it before the model (Euler, Heun, KDPM2:
    (x0 + sigma noise) / sqrt(sigma^2 + 1) is the same input). Between integer timesteps sigma is
    interpolated linearly, as Euler's `set_timesteps` does, so a fractional timestep of a plan gets the
    input its loop feeds (scheduler.add_noise would look it up in the last planned grid, or cast it to an
    integer). Flow matching: a = 1 - t / T, s = t / T."""
    if not hasattr(scheduler, "alphas_cumprod"):
        s = t.float() / scheduler.config.num_train_timesteps
        return 1 - s, s
    cumprod = scheduler.alphas_cumprod.float()
    t = t.double().clamp(0, len(cumprod) - 1)
    at = cumprod[t.round().long()]  # integer timesteps: exactly diffusers' add_noise
    a, s = at.sqrt(), (1 - at).sqrt()
    between = t != t.round()
    if bool(between.any()):
        sigmas = ((1 - cumprod.double()) / cumprod.double()).sqrt().numpy()
        sigma = torch.from_numpy(np.interp(t[between].numpy(), np.arange(len(sigmas)), sigmas))
        a[between] = (1 + sigma.square()).rsqrt().float()
        s[between] = (sigma * (1 + sigma.square()).rsqrt()).float()
    return a, s


def add_noise(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 noised to timesteps `t` as the model sees it there (signal_and_noise)."""
    a, s = (v.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) for v in signal_and_noise(scheduler, t))
    return a * x0 + s * noise


def training_target(
    scheduler: Any, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the denoiser predicts for add_noise(x0, noise, t): epsilon, v, x0, or the flow velocity."""
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "v_prediction":  # v = a noise - s x0 (Salimans & Ho 2022)
        a, s = (v.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) for v in signal_and_noise(scheduler, t))
        return a * noise - s * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return noise
    raise ValueError(f"no training target for prediction type {prediction_type!r}")
