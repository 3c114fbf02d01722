"""The graph variants a program's loop runs, built in one place.

A plan without a cache schedule runs one variant, "denoiser". A cache schedule runs "full" (the whole
network; it also writes the carried tensor) at refresh steps and "cached" (the region skipped; it reads
the carried tensor) at the others (`SamplingPlan.variant`). Export, FLOP counting, the torch loop and
the backends' runners all take their variants from `graph_variants`, so a new variant is added here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.adapters import denoiser_module
from core.caching import CACHE, steps_module
from core.ir import CACHED, DENOISER, FULL, DiffusionProgram
from core.sampling import Variants

__all__ = ["CACHED", "DENOISER", "FULL", "GraphVariant", "example_carry", "graph_variants", "torch_loop"]


@dataclass(frozen=True)
class GraphVariant:
    """One network variant: called as (sample, timestep, class_labels or None, *carried_in) and returning
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
        FULL: GraphVariant(FULL, steps_module(program, FULL, region), carried_out=(CACHE,)),
        CACHED: GraphVariant(CACHED, steps_module(program, CACHED, region), carried_in=(CACHE,)),
    }


def torch_loop(program: DiffusionProgram) -> Variants:
    """The program's loop callables in torch (see core.sampling.StepFn), one per graph variant."""
    return {name: _step_fn(variant) for name, variant in graph_variants(program).items()}


def _step_fn(variant: GraphVariant):
    def step(x, t, y, carry: dict[str, torch.Tensor]):
        with torch.inference_mode():
            result = variant.module(x, t, y, *(carry[name] for name in variant.carried_in))
        if not variant.carried_out:
            return result, {}
        out, *written = result
        return out, dict(zip(variant.carried_out, written, strict=True))

    return step
