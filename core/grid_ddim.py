"""DDIM on any timestep grid: diffusers' DDIMScheduler, which only spaces its own grid, taught custom
`timesteps` (as DDPMScheduler and DPMSolverMultistepScheduler take them).

Searched schedules (Align-Your-Steps, Sabour et al. 2024) and progressively distilled students
(Salimans & Ho 2022) run DDIM between arbitrary timesteps. The update is DDIM's deterministic one
(eta = 0; Song et al. 2021, eq. 12) with the same x0 clipping/thresholding as the parent, so on the
parent's own grid the samples are identical (tested).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput


class GridDDIMScheduler(DDIMScheduler):
    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, timesteps: list[int] | None = None
    ) -> None:
        if timesteps is None:
            super().set_timesteps(num_inference_steps, device)
            return
        steps = [int(t) for t in timesteps]
        if any(a <= b for a, b in itertools.pairwise(steps)) or not 0 <= steps[-1] <= steps[0]:
            raise ValueError("custom timesteps must be descending and >= 0")
        if steps[0] >= self.config.num_train_timesteps:
            raise ValueError(f"timesteps must be below num_train_timesteps ({self.config.num_train_timesteps})")
        self.num_inference_steps = len(steps)
        self.timesteps = torch.tensor(steps, dtype=torch.int64, device=device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> DDIMSchedulerOutput | tuple:
        t = int(timestep)
        later = [int(s) for s in self.timesteps if int(s) < t]
        prev = max(later) if later else -1
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = x0_and_eps(self.config.prediction_type, model_output, sample, alpha)
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        prev_sample = alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
        if not return_dict:
            return (prev_sample, x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


def x0_and_eps(
    prediction_type: str, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    beta = 1 - alpha
    if prediction_type == "epsilon":
        return (x - beta**0.5 * out) / alpha**0.5, out
    if prediction_type == "sample":
        return out, (x - alpha**0.5 * out) / beta**0.5
    if prediction_type == "v_prediction":
        return alpha**0.5 * x - beta**0.5 * out, alpha**0.5 * out + beta**0.5 * x
    raise ValueError(f"prediction_type {prediction_type!r} must be epsilon, sample or v_prediction")
