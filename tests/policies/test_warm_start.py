"""Warm-started chunks (core.warm_start, passes/warm_start.py): the tail of the loop a later decision runs, its
start from the previous chunk, the policy that keeps each episode's last chunk, plan.json, and the pass's
refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core import warm_start
from core.environments import pusht
from core.environments.programs import as_policy
from core.errors import ConfigError
from core.ir import Chunking, SamplingPlan
from core.schedulers import build_scheduler

DDPM = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True}


def ddpm(steps: int = 10, warm: float | None = 30.0) -> SamplingPlan:
    return SamplingPlan("DDPMScheduler", dict(DDPM), steps, warm_start=warm)


def test_a_warm_decision_runs_the_timesteps_at_or_below_the_warm_start():
    tail = warm_start.tail(ddpm(10, 30.0))
    assert tail.timesteps == (30.0, 20.0, 10.0, 0.0) and tail.num_inference_steps == 4 and tail.warm_start is None
    assert [int(t) for t in build_scheduler(tail).timesteps] == [30, 20, 10, 0]
    assert warm_start.tail(ddpm(16, 30.0)).timesteps == (30.0, 24.0, 18.0, 12.0, 6.0, 0.0)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (ddpm(10, 95.0), "must lie within the loop's timesteps"),  # above every timestep: the whole loop
        (SamplingPlan("DDPMScheduler", dict(DDPM), 2, timesteps=(90.0, 50.0), warm_start=30.0), "within"),
        (SamplingPlan("HeunDiscreteScheduler", {"num_train_timesteps": 100}, 5, warm_start=30.0), "one network"),
        (SamplingPlan("EulerDiscreteScheduler", {"num_train_timesteps": 100}, 10, warm_start=30.0), "forward"),
    ],
)
def test_a_warm_start_the_loop_cannot_take_is_refused(plan, message):
    with pytest.raises(ConfigError, match=message):
        warm_start.tail(plan)


def test_the_start_is_the_previous_chunk_shifted_by_the_executed_actions_and_noised():
    warm = warm_start.WarmStart(ddpm(10, 30.0), Chunking(2, 3))
    previous = torch.arange(2 * 8 * 2, dtype=torch.float32).reshape(2, 8, 2) / 40
    start = warm.start(previous, [5, 6])
    shifted = torch.cat([previous[:, 3:], previous[:, -1:].expand(-1, 3, -1)], dim=1)
    abar = build_scheduler(warm.plan).alphas_cumprod[30]
    noise = (start - abar.sqrt() * shifted) / (1 - abar).sqrt()
    expected = torch.cat(
        [torch.randn((1, 8, 2), generator=torch.Generator().manual_seed(s + warm_start.WARM_NOISE)) for s in (5, 6)]
    )
    assert torch.allclose(noise, expected, atol=1e-4)
    assert torch.equal(start, warm.start(previous, [5, 6]))  # a seed's noise alone


def test_the_policy_starts_each_episodes_later_decisions_from_its_own_last_chunk():
    plan, chunking = ddpm(10, 30.0), Chunking(2, 4)
    calls = []

    def sampler(seeds, rows, *, plan, start):
        calls.append((list(seeds), plan, start))
        return torch.stack([torch.full((8, 2), float(s % 100) / 100) for s in seeds])

    policy = as_policy(sampler, lambda x: x, 0, plan, chunking)
    obs = lambda n: {pusht.STATE: np.zeros((n, 2, 2), np.float32)}  # noqa: E731
    policy(0, np.array([0, 1, 2]), obs(3))
    policy(1, np.array([0, 2]), obs(2))  # episode 1 finished
    (seeds0, plan0, start0), (seeds1, plan1, start1) = calls
    assert plan0 == plan and start0 is None
    assert plan1 == warm_start.tail(plan) and start1.shape == (2, 8, 2)
    previous = torch.stack([torch.full((8, 2), float(s % 100) / 100) for s in (seeds0[0], seeds0[2])])
    assert torch.equal(start1, warm_start.WarmStart(plan, chunking).start(previous, seeds1))


def test_plan_json_keeps_the_warm_start_and_refuses_a_bad_one():
    plan = ddpm(16, 30.0)
    assert SamplingPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ConfigError, match=r"sampling\.warm_start"):
        SamplingPlan.from_dict({**plan.to_dict(), "warm_start": -1})
    with pytest.raises(ConfigError, match="'warm_start' must be int or float or null"):
        SamplingPlan.from_dict({**plan.to_dict(), "warm_start": "30"})
    assert dataclasses.replace(plan, warm_start=None).without_loop_policy() == plan.without_loop_policy()


def test_a_ddim_plan_warm_starts_on_the_grid_ddim_sampler_and_a_guided_plan_is_refused():
    plan = SamplingPlan("DDIMScheduler", dict(DDPM), 10, warm_start=30.0)
    tail = warm_start.tail(plan)
    assert tail.scheduler_class == "GridDDIMScheduler" and tail.timesteps == (30.0, 20.0, 10.0, 0.0)
    assert [int(t) for t in build_scheduler(tail).timesteps] == [30, 20, 10, 0]
    guided = SamplingPlan("DDPMScheduler", dict(DDPM), 10, 2.0, (True,) * 10, warm_start=30.0)
    with pytest.raises(ConfigError, match="per-step guidance policy"):
        warm_start.tail(guided)
