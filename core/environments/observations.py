"""A policy's observation set (what calibration, verification and distillation condition on): the observations
the original policy itself meets, closed loop in its environment, at every decision of a few fixed episodes."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from core.environments import check_fits, programs, rollout
from core.errors import ConfigError
from core.ir import DiffusionProgram

EPISODE_SEED = 300_000  # initial states of the episodes observations are collected in
EPISODES = 32  # episodes observed, each to its end (success or the environment's limit)
ROWS = 1024  # observations in a policy's set (calibration, verification and distillation cycle through them)


def attach(program: DiffusionProgram, name: str | None, where: str) -> DiffusionProgram:
    """A policy with its environment (`name`, else the one it was loaded with) checked against its inputs and
    its observation set collected there (kept when it has one); any other model as it is (`name` refused)."""
    conditioning, stages = program.spec.conditioning, program.stages
    if not conditioning.observation:
        if name is not None:
            raise ConfigError(f"--env: {where} is not a policy (it takes no observations)")
        return program
    name = name or stages.environment
    if name is None:
        raise ConfigError(f"{where}: a policy is judged in its environment: pass --env (known: pusht)")
    shapes = {c.name: c.shape[1:] for c in conditioning.observation}
    check_fits(name, shapes, program.spec.sample_shape[-1], where)
    observed = stages.observations or collect(program, name, ROWS)
    return program.replace(stages=dataclasses.replace(stages, environment=name, observations=observed))


def collect(program: DiffusionProgram, env_name: str, rows: int) -> dict[str, torch.Tensor]:
    """Up to `rows` observations (name -> [rows, n_obs_steps, dim], raw), drawn without replacement (a fixed
    permutation) from every decision of EPISODES whole episodes of the original policy, each episode's while it
    runs: the states a policy meets late in an episode as well as early (a student distilled on early states
    alone failed closed loop: BENCHMARKS.md). Fewer when the episodes end sooner (at most 32 x 38 on PushT)."""
    chunking = program.spec.chunking
    assert chunking is not None, "only a policy has observations to collect"
    seeds = list(range(EPISODE_SEED, EPISODE_SEED + EPISODES))
    done = rollout.run(
        env_name,
        programs.torch_policy(program, EPISODE_SEED),
        seeds,
        chunking,
        record=True,
        desc=f"observation set: the original closed loop, {EPISODES} episodes",
    )
    names = list(done.decisions[0])
    stacked = {k: np.concatenate([d[k] for d in done.decisions]) for k in names}
    order = np.random.default_rng(EPISODE_SEED).permutation(len(stacked[names[0]]))[:rows]
    return {k: torch.from_numpy(v[order]).float() for k, v in stacked.items()}
