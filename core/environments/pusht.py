"""PushT (gym-pusht, the benchmark LeRobot and Diffusion Policy report): push a T-shaped block onto a fixed
goal pose with a circular agent. Observations as LeRobot's `pusht_keypoints` policies read them
(`obs_type="environment_state_agent_pos"`): the agent's position and the block's 8 keypoints; actions are
the agent's target position in [0, 512]^2. Success: coverage of the goal above 0.95 (the library's own
`is_success`); an episode lasts at most 300 control steps at 10 Hz, as LeRobot evaluates.

Episodes run in lockstep (`Batch`): one env per episode, reset from its own seed, so the original and a
candidate see the same initial states."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.errors import ConfigError

ENV_ID = "gym_pusht/PushT-v0"
STATE = "observation.state"  # the agent's (x, y)
ENV_STATE = "observation.environment_state"  # the block's 8 (x, y) keypoints, flattened
OBSERVATIONS = {STATE: (2,), ENV_STATE: (16,)}
ACTION_DIM = 2
ACTION_RANGE = (0.0, 512.0)
MAX_STEPS = 300
CONTROL_HZ = 10
INSTALL = 'pip install "gym-pusht==0.1.8" "pymunk>=6,<7"'


def make_env() -> Any:
    """One PushT env (the unwrapped PushTEnv: lockstep batches stop episodes themselves)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pygame's and pkg_resources' import-time notices
            import gym_pusht  # noqa: F401  registers ENV_ID
            import gymnasium as gym
    except ImportError as exc:
        raise ConfigError(f"the PushT environment is not installed ({exc.name}): {INSTALL}") from None
    return gym.make(ENV_ID, obs_type="environment_state_agent_pos").unwrapped


def observation(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The env's observation under LeRobot's feature names."""
    return {
        STATE: np.asarray(obs["agent_pos"], np.float32),
        ENV_STATE: np.asarray(obs["environment_state"], np.float32),
    }


class Batch:
    """N episodes in lockstep, episode i reset from `seeds[i]`. A finished (successful) episode is no longer
    stepped; its last observation stays in the batch so the policy's batch keeps its shape."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.envs = [make_env() for _ in seeds]
        self.last = [observation(env.reset(seed=int(s))[0]) for env, s in zip(self.envs, seeds, strict=True)]
        n = len(seeds)
        self.max_coverage = np.zeros(n)
        self.success: np.ndarray = np.zeros(n, dtype=bool)
        self.steps: np.ndarray = np.zeros(n, dtype=int)

    def observations(self) -> dict[str, np.ndarray]:
        return {k: np.stack([o[k] for o in self.last]) for k in OBSERVATIONS}

    def step(self, actions: np.ndarray) -> dict[str, np.ndarray]:
        """Apply one action per episode ([N, 2]); finished episodes ignore theirs. Returns the observations."""
        for i, env in enumerate(self.envs):
            if self.success[i]:
                continue
            obs, _, terminated, _, info = env.step(np.asarray(actions[i], np.float64))
            self.last[i] = observation(obs)
            self.max_coverage[i] = max(self.max_coverage[i], info["coverage"])
            self.success[i] = bool(info["is_success"]) or bool(terminated)
            self.steps[i] += 1
        return self.observations()

    def close(self) -> None:
        for env in self.envs:
            env.close()
