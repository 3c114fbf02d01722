"""Custom timestep grids: DDIM on any grid, the grid solvers, plan.json round trip, and the first-order
step the distillation passes train through."""

import dataclasses
import json

import pytest
import torch

from core.distill import FirstOrder
from core.errors import ConfigError
from core.ir import SamplingPlan
from core.sampling import sample
from core.schedulers import build_scheduler, on_grid
from passes.progressive_distill import rounds

COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def gaussian_denoiser(plan: SamplingPlan, scale: float = 1.5):
    """The exact denoiser of N(0, 0.25 I) data (times `scale`, so DDIM's x0 clipping engages), in the
    plan's prediction type: a stand-in with a known answer, not a fidelity claim."""
    cumprod = build_scheduler(plan).alphas_cumprod
    kind = plan.scheduler_config.get("prediction_type", "epsilon")

    def denoise(x, t, cond):
        a = cumprod[t.long()].view(-1, 1, 1, 1)
        eps = scale * (1 - a).sqrt() * x / (a * 0.25 + (1 - a))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]

    return denoise


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_grid_ddim_on_ddims_own_grid_is_ddim(kind):
    plan = SamplingPlan("DDIMScheduler", {**COSINE, "prediction_type": kind}, 20)  # clip_sample on (default)
    grid = [float(t) for t in build_scheduler(plan).timesteps]
    moved = on_grid(plan, "ddim", grid)
    assert moved.scheduler_class == "GridDDIMScheduler" and moved.timesteps == tuple(grid)
    denoise = gaussian_denoiser(plan)
    assert torch.equal(sample(plan, (1, 8, 8), denoise, [1, 2]), sample(moved, (1, 8, 8), denoise, [1, 2]))


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++", "unipc", "euler"])
def test_every_grid_solver_runs_the_given_timesteps(solver):
    plan = on_grid(SamplingPlan("DDIMScheduler", COSINE, 20), solver, (990.0, 700.0, 300.0, 50.0))
    assert [int(t) for t in build_scheduler(plan).timesteps] == [990, 700, 300, 50]
    seen = []
    sample(plan, (1, 4, 4), lambda x, t, c: seen.append(float(t[0])) or torch.zeros_like(x), [0])
    assert seen == [990.0, 700.0, 300.0, 50.0]
    assert SamplingPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # plan.json round trip


def test_a_plan_refuses_a_bad_grid():
    with pytest.raises(ConfigError, match="descending"):
        SamplingPlan("GridDDIMScheduler", COSINE, 3, timesteps=(500.0, 700.0, 100.0))
    with pytest.raises(ConfigError, match="descending"):
        SamplingPlan.from_dict({**SamplingPlan("DDIMScheduler", COSINE, 2).to_dict(), "timesteps": [900, 100, 50]})
    with pytest.raises(ConfigError, match="custom timestep grid"):
        build_scheduler(dataclasses.replace(SamplingPlan("DDIMScheduler", COSINE, 2), timesteps=(900.0, 100.0)))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_first_order_step_is_the_samplers_step(kind):
    """What distillation trains through equals what the student's loop then runs (GridDDIM, unclipped)."""
    plan = on_grid(
        SamplingPlan("DDIMScheduler", {**COSINE, "prediction_type": kind, "clip_sample": False}, 3),
        "ddim",
        (800.0, 400.0, 100.0),
    )
    scheduler, steps = build_scheduler(plan), FirstOrder(plan, kind)
    z, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t, t_next in ((800, 400.0), (400, 100.0), (100, None)):
        expected = scheduler.step(out, t, z).prev_sample
        torch.testing.assert_close(steps.step(out, z, [t, t], [t_next, t_next]), expected, rtol=1e-4, atol=1e-5)


def test_the_flow_euler_step_is_flow_matchings():
    plan = on_grid(SamplingPlan("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 2), "euler", (1000.0, 600.0, 250.0))
    scheduler, steps = build_scheduler(plan), FirstOrder(plan, "flow")
    z, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    for t, t_next in ((1000.0, 600.0), (600.0, 250.0), (250.0, None)):
        torch.testing.assert_close(steps.step(out, z, [t], [t_next]), scheduler.step(out, t, z).prev_sample)


def test_progressive_rounds_halve_and_merge_high_noise_pairs_first():
    assert [len(g) for g in rounds(20, 4)] == [10, 5, 4]
    assert rounds(5, 4) == [[2, 1, 1, 1]]
    assert [sum(g) for g in rounds(20, 1)] == [20, 10, 5, 3, 2]
    assert rounds(4, 4) == []
