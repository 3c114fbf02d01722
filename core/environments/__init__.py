"""Simulated environments a policy is judged in, closed loop, by name (`--env`, or the policy's own training
config). Each module gives the observation names and shapes it reports, its action range and a lockstep
`Batch` of episodes (see core.environments.pusht)."""

from __future__ import annotations

import math
from types import ModuleType

from core.errors import ConfigError

NAMES = ("pusht",)


def environment(name: str) -> ModuleType:
    if name not in NAMES:
        raise ConfigError(f"unknown environment '{name}' (known: {', '.join(NAMES)})")
    from core.environments import pusht

    return pusht


def decisions_per_episode(name: str, n_action_steps: int) -> int:
    """Decisions in an episode of the environment's step limit, each executing `n_action_steps` actions."""
    return math.ceil(environment(name).MAX_STEPS / n_action_steps)


def check_fits(name: str, observations: dict[str, tuple[int, ...]], action_dim: int, where: str) -> None:
    """A policy's observation inputs (name -> per-step shape) and action size must be what the env gives."""
    env = environment(name)
    for key, shape in observations.items():
        if key not in env.OBSERVATIONS:
            raise ConfigError(
                f"{where}: the {name} environment gives no '{key}' (it gives {', '.join(env.OBSERVATIONS)})"
            )
        if tuple(shape) != env.OBSERVATIONS[key]:
            raise ConfigError(
                f"{where}: '{key}' is {list(shape)} per step, the {name} environment gives "
                f"{list(env.OBSERVATIONS[key])}"
            )
    if action_dim != env.ACTION_DIM:
        raise ConfigError(
            f"{where}: the policy acts in {action_dim} dimensions, the {name} environment takes {env.ACTION_DIM}"
        )
