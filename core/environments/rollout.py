"""Closed-loop episodes of a chunking policy, as LeRobot's `select_action` runs one: an observation queue
of `n_obs_steps` (the first observation repeated to fill it), one action chunk per `n_action_steps`
control steps, of which the actions from the current observation on are executed (core.ir.Chunking).
All episodes step in lockstep, so one policy call serves the whole batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.environments import environment
from core.ir import Chunking
from core.progress import progress

# (decision index, the running episodes' indices [M], their observations (name -> [M, n_obs_steps, dim], raw))
# -> their action chunks ([M, horizon, action_dim], raw)
Policy = Callable[[int, np.ndarray, dict[str, np.ndarray]], np.ndarray]


@dataclass
class Episodes:
    seeds: list[int]
    success: np.ndarray  # [N] bool
    max_coverage: np.ndarray  # [N]
    steps: np.ndarray  # [N] control steps taken (to success, or the limit)
    calls: int  # policy calls (each one batched over the episodes still running)
    decisions: list[dict[str, np.ndarray]] = field(default_factory=list)  # the observations of every call

    @property
    def success_rate(self) -> float:
        return float(self.success.mean()) if len(self.seeds) else 0.0

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        return success_interval(int(self.success.sum()), len(self.seeds), level)


def success_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The equal-tailed interval of the success rate's Beta(1 + s, 1 + n - s) posterior (a uniform prior), as
    LeRobot reports its evaluations; at s = 0 its low end is 0 and at s = n its high end 1 (Brown, Cai and
    DasGupta's boundary rule, so the observed rate always lies in its own interval)."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    a, b = 1 + successes, 1 + n - successes
    low = 0.0 if successes == 0 else float(beta.ppf(tail, a, b))
    high = 1.0 if successes == n else float(beta.ppf(1 - tail, a, b))
    return low, high


def run(
    env: str,
    policy: Policy,
    seeds: Sequence[int],
    chunking: Chunking,
    max_steps: int | None = None,
    record: bool = False,
    desc: str | None = None,
) -> Episodes:
    """One episode per seed in environment `env` (core.environments), at most `max_steps` control steps
    (default: the environment's episode limit); `record`: keep the observations each policy call saw (the
    running episodes'; a finished episode's frozen state is not asked about); `desc`:
    show progress (core.progress: a bar on a terminal, lines in a CI log)."""
    n_obs_steps, n_action_steps = chunking.n_obs_steps, chunking.n_action_steps
    module = environment(env)
    max_steps = module.MAX_STEPS if max_steps is None else max_steps
    batch = module.Batch(seeds)
    chunk_shape = (chunking.first + n_action_steps, module.ACTION_DIM)  # the part of a chunk that runs
    try:
        history = [batch.observations()] * n_obs_steps
        calls, decisions = 0, []
        starts = range(0, max_steps, n_action_steps)
        for step in starts if desc is None else progress(starts, desc=desc, total=len(starts)):
            if batch.success.all():
                break
            observed = {k: np.stack([h[k] for h in history], axis=1) for k in history[0]}
            running = np.flatnonzero(~batch.success)  # finished episodes are not sampled for
            asked = {k: v[running] for k, v in observed.items()}
            if record:
                decisions.append(asked)
            chunk = np.zeros((len(seeds), *chunk_shape))
            actions = policy(calls, running, asked)
            chunk[running] = np.asarray(actions, np.float64)[:, : chunk_shape[0]]
            calls += 1
            start = chunking.first
            for j in range(min(n_action_steps, max_steps - step)):
                history = [*history[1:], batch.step(chunk[:, start + j])]
        return Episodes(
            list(seeds), batch.success.copy(), batch.max_coverage.copy(), batch.steps.copy(), calls, decisions
        )
    finally:
        batch.close()
