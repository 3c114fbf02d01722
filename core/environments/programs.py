"""A program (or a lowered artifact's sampler) as a closed-loop policy (core.environments.rollout.Policy):
raw observations in, normalized by the program's observation stage, sampled with fresh seeds per call (the
i-th decision's episode j draws seed `seed + i * stride + j`, so the original and a candidate draw the same
noise on the same decision, whichever other episodes still run), un-normalized by its output stage into raw
actions. A plan with warm-started chunks (core.warm_start) keeps each running episode's last chunk and starts
its next decision from it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from core import warm_start
from core.conditions import split_rows
from core.environments.rollout import Policy
from core.ir import Chunking, DiffusionProgram, SamplingPlan

STRIDE = 100_000  # seeds per policy call (episodes per batch stay below it)


class Sampler(Protocol):
    """(seeds, observations one per seed, the loop, its initial samples or None: noise) -> final samples in
    model space."""

    def __call__(
        self, seeds: Sequence[int], conditions: list[dict[str, torch.Tensor]], *, plan: SamplingPlan, start: Any
    ) -> torch.Tensor: ...


def as_policy(
    sampler: Sampler,
    decode: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
    plan: SamplingPlan,
    chunking: Chunking,
) -> Policy:
    warm = None if plan.warm_start is None else warm_start.WarmStart(plan, chunking)
    previous: dict[int, torch.Tensor] = {}  # the last chunk of each running episode (warm starts)

    def policy(decision: int, episodes: np.ndarray, observed: dict[str, np.ndarray]) -> np.ndarray:
        rows = split_rows({k: torch.as_tensor(v, dtype=torch.float32) for k, v in observed.items()})
        seeds = [seed + decision * STRIDE + int(e) for e in episodes]
        if warm is None or decision == 0:
            final = sampler(seeds, rows, plan=plan, start=None)
        else:
            prior = torch.stack([previous[int(e)] for e in episodes])
            final = sampler(seeds, rows, plan=warm.plan, start=warm.start(prior, seeds))
        if warm is not None:
            previous.update(zip((int(e) for e in episodes), final, strict=True))
        return decode(final).numpy()

    return policy


def torch_policy(program: DiffusionProgram, seed: int = 0, loop: Any = None) -> Policy:
    """The program in torch (`loop`: other loop callables, e.g. a candidate's variants)."""
    from core.variants import sample_program

    norm, chunking = program.spec.output_normalization, program.spec.chunking
    assert chunking is not None, "only a policy acts in an environment"

    def sampler(
        seeds: Sequence[int], conditions: list[dict[str, torch.Tensor]], *, plan: SamplingPlan, start: Any
    ) -> torch.Tensor:
        return sample_program(program.replace(plan=plan), seeds, conditions, loop, start=start)

    decode = (lambda x: x) if norm is None else norm.denormalize
    return as_policy(sampler, decode, seed, program.plan, chunking)
