"""core.ddpm_step equals diffusers' DDPMScheduler.step bit for bit, step by step, with the same per-sample noise,
for the configurations it takes; the others are left to diffusers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.ddpm_step import ddpm_steps, diffusers_steps
from core.ir import SamplingPlan
from core.schedulers import build_scheduler

LEROBOT = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True}


@pytest.mark.parametrize(
    ("config", "steps", "timesteps", "batch"),
    [
        (LEROBOT, 16, None, 1),
        (LEROBOT, 100, None, 3),
        (LEROBOT, 6, (30.0, 24.0, 18.0, 12.0, 6.0, 0.0), 2),  # a warm decision's tail: custom timesteps
        ({**LEROBOT, "clip_sample": False, "prediction_type": "sample"}, 10, None, 2),
        ({"num_train_timesteps": 1000, "prediction_type": "v_prediction", "clip_sample_range": 2.0}, 20, None, 2),
        ({"num_train_timesteps": 1000, "variance_type": "fixed_large", "timestep_spacing": "trailing"}, 8, None, 1),
    ],
)
def test_each_step_equals_diffusers_ddpm_step(config, steps, timesteps, batch):
    plan = SamplingPlan("DDPMScheduler", config, steps, timesteps=timesteps)
    fast, scheduler = ddpm_steps(plan), build_scheduler(plan)
    assert fast is not None and torch.equal(fast.timesteps, scheduler.timesteps)
    x = torch.randn(batch, 16, 2, generator=torch.Generator().manual_seed(0))
    ours, theirs = x.clone(), x.clone()
    mine = [torch.Generator().manual_seed(10 + b) for b in range(batch)]
    diffusers_gens = [torch.Generator().manual_seed(10 + b) for b in range(batch)]
    for i, t in enumerate(scheduler.timesteps):
        out = torch.randn(batch, 16, 2, generator=torch.Generator().manual_seed(100 + i)) * 1.5
        theirs = scheduler.step(out, t, theirs, generator=diffusers_gens).prev_sample
        ours = fast.step(i, out, ours, mine)
        assert torch.equal(ours, theirs), (i, (ours - theirs).abs().max())
    assert all(a.get_state().equal(b.get_state()) for a, b in zip(mine, diffusers_gens, strict=True))


def test_configurations_it_does_not_reproduce_run_diffusers_step():
    thresholded = SamplingPlan("DDPMScheduler", {**LEROBOT, "thresholding": True}, 10)
    learned = SamplingPlan("DDPMScheduler", {**LEROBOT, "variance_type": "learned_range"}, 10)
    ddim = SamplingPlan("DDIMScheduler", LEROBOT, 10)
    assert ddpm_steps(thresholded) is None and ddpm_steps(learned) is None and ddpm_steps(ddim) is None
    assert ddpm_steps(dataclasses.replace(thresholded, scheduler_config=LEROBOT)) is not None


def test_a_baseline_timed_as_its_users_run_it_takes_diffusers_step():
    plan = SamplingPlan("DDPMScheduler", LEROBOT, 10)
    with diffusers_steps():
        assert ddpm_steps(plan) is None
    assert ddpm_steps(plan) is not None
