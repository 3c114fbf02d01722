"""PushT in lockstep (gym-pusht's own physics and success test), chunked closed-loop episodes as LeRobot's
select_action runs them, the success interval, and the scripted expert the demonstrations come from."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from core.environments import check_fits, environment, pusht, rollout
from core.errors import ConfigError
from core.ir import Chunking


def test_episodes_reset_from_their_seeds():
    a, b = pusht.Batch([7, 8]), pusht.Batch([7, 9])
    oa, ob = a.observations(), b.observations()
    assert oa[pusht.STATE].shape == (2, 2) and oa[pusht.ENV_STATE].shape == (2, 16)
    np.testing.assert_array_equal(oa[pusht.ENV_STATE][0], ob[pusht.ENV_STATE][0])
    assert not np.array_equal(oa[pusht.ENV_STATE][1], ob[pusht.ENV_STATE][1])


def test_a_missing_environment_library_is_one_line(monkeypatch):
    real = builtins.__import__

    def no_gym_pusht(name, *args, **kwargs):
        if name == "gym_pusht":
            raise ImportError("no module", name="gym_pusht")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gym_pusht)
    with pytest.raises(ConfigError, match="the PushT environment is not installed \\(gym_pusht\\): pip install"):
        pusht.make_env()


def test_an_unknown_environment_or_a_policy_that_does_not_fit_it_is_refused():
    with pytest.raises(ConfigError, match="unknown environment 'mujoco' \\(known: pusht\\)"):
        environment("mujoco")
    with pytest.raises(ConfigError, match=r"'observation\.state' is \[3\] per step, the pusht environment gives \[2\]"):
        check_fits("pusht", {pusht.STATE: (3,)}, 2, "p")
    with pytest.raises(ConfigError, match="acts in 3 dimensions, the pusht environment takes 2"):
        check_fits("pusht", {pusht.STATE: (2,)}, 3, "p")


def test_a_chunked_episode_calls_the_policy_every_n_action_steps_from_the_current_observation():
    seen = []

    def policy(decision, episodes, observed):
        assert decision == len(seen) and list(episodes) == [0, 1]  # no episode succeeds in 10 steps
        seen.append({k: v.copy() for k, v in observed.items()})
        chunk = np.full((len(observed[pusht.STATE]), 8, 2), np.nan)
        chunk[:, 1:4] = observed[pusht.STATE][:, -1:, :] + 5.0  # only chunk[first : first + n_action_steps] is valid
        return chunk

    done = rollout.run("pusht", policy, [3, 4], Chunking(n_obs_steps=2, n_action_steps=3), max_steps=10, record=True)
    assert done.calls == 4 and len(done.decisions) == 4  # ceil(10 / 3) decisions
    first = seen[0][pusht.STATE]
    np.testing.assert_array_equal(first[:, 0], first[:, 1])  # the first observation fills the queue
    assert all(np.isfinite(s[pusht.STATE]).all() for s in seen)  # no NaN action (outside the window) ran
    assert not np.array_equal(seen[1][pusht.STATE][:, 1], seen[1][pusht.STATE][:, 0])  # the queue moved
    assert list(done.steps) == [10, 10]


def test_the_success_interval_holds_the_observed_rate_and_narrows_with_episodes():
    assert rollout.success_interval(0, 10)[0] == 0.0 and rollout.success_interval(10, 10)[1] == 1.0
    low, high = rollout.success_interval(6, 10)
    assert low < 0.6 < high
    low_n, high_n = rollout.success_interval(60, 100)
    assert low < low_n < 0.6 < high_n < high


def test_the_scripted_expert_solves_episodes_from_privileged_state():
    from zoo.pusht_expert import Expert

    for seed in (1000, 1002):
        env = pusht.make_env()
        env.reset(seed=seed)
        expert = Expert(seed)
        for _ in range(pusht.MAX_STEPS):
            _, _, terminated, _, info = env.step(np.clip(expert.act(env), *pusht.ACTION_RANGE))
            if terminated:
                break
        assert info["is_success"] and info["coverage"] > 0.95


def test_an_episode_draws_its_noise_by_decision_and_episode_whichever_others_still_run():
    import torch

    from core.environments.programs import STRIDE, as_policy
    from core.ir import Chunking, SamplingPlan

    drawn = []

    def sampler(seeds, rows, *, plan, start):
        drawn.append(list(seeds))
        return torch.zeros(len(rows), 8, 2)

    plan = SamplingPlan("DDPMScheduler", {"num_train_timesteps": 100}, 10)
    policy = as_policy(sampler, lambda x: x + 1, 7, plan, Chunking(2, 4))
    obs = {pusht.STATE: np.zeros((2, 2, 2), np.float32)}
    out = policy(3, np.array([1, 4]), obs)
    assert drawn == [[7 + 3 * STRIDE + 1, 7 + 3 * STRIDE + 4]] and out.shape == (2, 8, 2) and (out == 1).all()


def test_only_running_episodes_observations_are_recorded(monkeypatch):
    # Episode 0 succeeds after the first chunk; its frozen state is not asked about, so not recorded either.
    import types

    class Batch:
        def __init__(self, seeds):
            self.success, self.t = np.zeros(len(seeds), bool), 0
            self.max_coverage, self.steps = np.zeros(len(seeds)), np.zeros(len(seeds), int)

        def observations(self):
            return {"s": np.array([[0.0], [100.0]]) + self.t}

        def step(self, actions):
            self.t += 1
            self.success[0] |= self.t >= 3
            return self.observations()

        def close(self):
            pass

    fake = types.SimpleNamespace(Batch=Batch, MAX_STEPS=9, ACTION_DIM=2)
    monkeypatch.setattr(rollout, "environment", lambda name: fake)
    policy = lambda decision, episodes, observed: np.zeros((len(episodes), 4, 2))  # noqa: E731
    done = rollout.run("fake", policy, [0, 1], Chunking(n_obs_steps=1, n_action_steps=3), record=True)
    assert [len(d["s"]) for d in done.decisions] == [2, 1, 1]
    assert [float(d["s"][-1, 0, 0]) for d in done.decisions] == [100.0, 103.0, 106.0]
