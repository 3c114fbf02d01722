"""A program (or a lowered artifact's sampler) as a closed-loop policy (core.environments.rollout.Policy):
raw observations in, normalized by the program's observation stage, sampled with fresh seeds per call (the
i-th decision's episode j draws seed `seed + i * stride + j`, so the original and a candidate draw the same
noise on the same decision, whichever other episodes still run), un-normalized by its output stage into raw
actions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from core.conditions import split_rows
from core.environments.rollout import Policy
from core.ir import DiffusionProgram

STRIDE = 100_000  # seeds per policy call (episodes per batch stay below it)

# (seeds, observations one per seed) -> final samples in model space
Sampler = Callable[[Sequence[int], list[dict[str, torch.Tensor]]], torch.Tensor]


def as_policy(sampler: Sampler, decode: Callable[[torch.Tensor], torch.Tensor], seed: int) -> Policy:
    def policy(decision: int, episodes: np.ndarray, observed: dict[str, np.ndarray]) -> np.ndarray:
        rows = split_rows({k: torch.as_tensor(v, dtype=torch.float32) for k, v in observed.items()})
        seeds = [seed + decision * STRIDE + int(e) for e in episodes]
        return decode(sampler(seeds, rows)).numpy()

    return policy


def torch_policy(program: DiffusionProgram, seed: int = 0, loop: Any = None) -> Policy:
    """The program in torch (`loop`: other loop callables, e.g. a candidate's variants)."""
    from core.variants import sample_program

    norm = program.spec.output_normalization

    def sampler(seeds: Sequence[int], rows: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return sample_program(program, seeds, rows, loop)

    return as_policy(sampler, (lambda x: x) if norm is None else norm.denormalize, seed)
