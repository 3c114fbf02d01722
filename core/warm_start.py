"""Warm-started action chunks (Streaming Diffusion Policy, Høeg et al. 2024; Real-Time Iteration for diffusion
policies, Duan et al. 2025). A policy's consecutive chunks overlap in time: after n_action_steps executed
actions, the previous chunk's remainder is where the next chunk begins. So an episode's first decision runs
the whole loop from noise, and every later one starts from the previous chunk shifted by n_action_steps (its
last action repeated to fill the horizon), noised by the forward process to the first of the plan's timesteps at
or below `plan.warm_start`, and runs only those timesteps: fewer network evaluations per decision."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch

from core.errors import ConfigError
from core.ir import Chunking, SamplingPlan
from core.sampling import initial_noise
from core.schedulers import build_scheduler, on_grid

WARM_NOISE = 1 << 40  # a warm start's noise draws from seed + WARM_NOISE (the loop's own steps from seed)


def tail(plan: SamplingPlan) -> SamplingPlan:
    """The loop of a warm decision: the plan's timesteps at or below `plan.warm_start`, as custom timesteps."""
    if plan.warm_start is None:
        raise ValueError("the plan starts every chunk from noise (no warm_start)")
    scheduler = build_scheduler(dataclasses.replace(plan, warm_start=None))
    timesteps = [float(t) for t in scheduler.timesteps]
    kept = tuple(t for t in timesteps if t <= plan.warm_start)
    where = f"warm start at timestep {plan.warm_start:g}"
    if len(timesteps) != plan.num_inference_steps or any(a <= b for a, b in itertools.pairwise(timesteps)):
        raise ConfigError(f"{where}: needs a sampler with one network evaluation per descending timestep")
    if not kept or len(kept) == len(timesteps):
        raise ConfigError(f"{where}: must lie within the loop's timesteps {[round(t) for t in timesteps]}")
    if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0 or not hasattr(scheduler, "add_noise"):
        raise ConfigError(f"{where}: {plan.scheduler_class} has no variance-preserving forward process to noise with")
    if plan.guided_steps is not None:
        raise ConfigError(f"{where}: a per-step guidance policy does not carry over to a warm loop's tail")
    if plan.scheduler_class == "DDIMScheduler":  # diffusers' DDIM takes no custom timesteps; ours does, equal
        return dataclasses.replace(on_grid(plan, "ddim", kept), warm_start=None)
    warm = dataclasses.replace(plan, num_inference_steps=len(kept), timesteps=kept, warm_start=None)
    build_scheduler(warm)  # the tail as its sampler plans it (a ConfigError here, not at the first warm decision)
    return warm


def episode_mean(first: float, later: float, decisions: int) -> float:
    """A per-decision cost (time, evaluations) over an episode of `decisions`: the first decision's whole loop,
    every later one's tail."""
    return (first + (decisions - 1) * later) / decisions


class WarmStart:
    """A plan's warm decisions: their loop (`tail`) and their initial samples (`start`), the noise schedule's
    coefficients at the loop's first timestep read once."""

    def __init__(self, plan: SamplingPlan, chunking: Chunking) -> None:
        self.plan, self.chunking = tail(plan), chunking
        scheduler = build_scheduler(self.plan)
        first = scheduler.timesteps[:1]
        # The scheduler's own forward process, add_noise(x, noise, t) = scale x + sigma noise, read once.
        self.scale = float(scheduler.add_noise(torch.ones(1), torch.zeros(1), first))
        self.sigma = float(scheduler.add_noise(torch.zeros(1), torch.ones(1), first))

    def start(self, previous: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The previous chunks [B, horizon, dim] (model space) shifted by the executed actions and noised to the
        loop's first timestep (q(x_t | x_0), one generator per seed, drawn apart from the loop's own noise)."""
        n = self.chunking.n_action_steps
        shifted = torch.cat([previous[:, n:], previous[:, -1:].expand(-1, n, -1)], dim=1)
        noise = initial_noise(previous.shape[1:], [torch.Generator().manual_seed(s + WARM_NOISE) for s in seeds])
        return self.scale * shifted + self.sigma * noise
