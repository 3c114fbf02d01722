"""The graph variants a program's loop runs, built in one place.

A plan without a cache schedule runs one variant, "denoiser". A cache schedule runs "full" (the whole
network; it also writes the carried tensor) at refresh steps and "cached" (the region skipped; it reads
the carried tensor) at the others (`SamplingPlan.variant`). Export, FLOP counting, the torch loop and
the backends' runners all take their variants from `graph_variants`, so a new variant is added here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.adapters import denoiser_module
from core.caching import CACHE, variant_module
from core.conditions import encode
from core.ir import CACHED, DENOISER, FULL, DiffusionProgram
from core.placement import from_module
from core.sampling import DenoiseFn, Variants, sample

__all__ = [
    "CACHED",
    "DENOISER",
    "FULL",
    "GraphVariant",
    "example_carry",
    "graph_variants",
    "sample_program",
    "torch_loop",
]


@dataclass(frozen=True)
class GraphVariant:
    """One network variant: called as (sample, timestep, *condition tensors, *carried_in) and returning
    the model output, followed by the `carried_out` tensors when it writes any."""

    name: str
    module: nn.Module
    carried_in: tuple[str, ...] = ()
    carried_out: tuple[str, ...] = ()


def example_carry(variants: dict[str, GraphVariant], *inputs: Any) -> dict[str, torch.Tensor]:
    """Example values of every carried tensor: each variant that writes some, run once on `inputs`."""
    carry: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for writer in (v for v in variants.values() if v.carried_out):
            carry.update(zip(writer.carried_out, writer.module(*inputs)[1:], strict=True))
    return carry


def graph_variants(program: DiffusionProgram, region: tuple[int, int] | None = None) -> dict[str, GraphVariant]:
    """The variants the program's plan runs; with `region`, the cache variants for that region instead
    (how the cache pass prices a candidate schedule before it exists)."""
    if region is None and program.plan.cache is None:
        return {DENOISER: GraphVariant(DENOISER, denoiser_module(program))}
    return {
        FULL: GraphVariant(FULL, variant_module(program, FULL, region), carried_out=(CACHE,)),
        CACHED: GraphVariant(CACHED, variant_module(program, CACHED, region), carried_in=(CACHE,)),
    }


def torch_loop(program: DiffusionProgram) -> Variants:
    """The program's loop callables in torch (see core.sampling.StepFn), one per graph variant."""
    names = program.spec.conditioning.input_names
    return {name: _step_fn(variant, names) for name, variant in graph_variants(program).items()}


def sample_program(
    program: DiffusionProgram,
    seeds: Sequence[int],
    conditions: Sequence[Any] | None = None,
    loop: DenoiseFn | Variants | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The program's loop (in torch, or `loop`: any backend's callables) on `seeds`, with one condition
    (class or prompt) per seed; see core.sampling.sample for `kwargs`."""
    batch = encode(program, conditions, len(seeds))
    if loop is None:  # the torch loop keeps its latents on the program's device; another backend's on the host
        loop, kwargs = torch_loop(program), {"device": program.placement.device, **kwargs}
    return sample(program.plan, program.spec.sample_shape, loop, seeds, batch, **kwargs)


def _step_fn(variant: GraphVariant, condition_names: tuple[str, ...]):
    def step(x, t, cond, carry: dict[str, torch.Tensor]):
        inputs = (*(cond[name] for name in condition_names), *(carry[name] for name in variant.carried_in))
        with torch.inference_mode():
            result = variant.module(x, t, *inputs)
        if not variant.carried_out:
            return from_module(result), {}
        out, *written = result
        return from_module(out), dict(zip(variant.carried_out, written, strict=True))

    return step
