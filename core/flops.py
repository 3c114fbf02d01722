"""Denoiser FLOPs, counted by torch's FlopCounterMode (matmuls, convolutions, attention) on real calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from core.ir import DiffusionProgram
from core.sampling import uses_guidance
from core.schedulers import model_calls
from core.variants import example_carry, graph_variants


def count_flops(fn: Callable[..., Any], *args: Any) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math attention kernel runs as counted matmuls; the fused CPU kernel has no FLOP formula.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(*args)
    return int(counter.get_total_flops())


def _inputs(program: DiffusionProgram) -> tuple[torch.Tensor, ...]:
    from core.conditions import example_conditions

    x = torch.zeros(1, *program.spec.sample_shape)
    t = torch.full((1,), 500.0)
    return (x, t, *example_conditions(program.spec.conditioning, 1).values())


def variant_flops(program: DiffusionProgram, region: tuple[int, int] | None = None) -> dict[str, int]:
    """FLOPs of one call of each graph variant the plan runs (or, with `region`, of that cache region's
    variants), for one sample (batch 1)."""
    variants = graph_variants(program, region)
    inputs = _inputs(program)
    carry = example_carry(variants, *inputs)
    return {name: count_flops(v.module, *inputs, *(carry[n] for n in v.carried_in)) for name, v in variants.items()}


def plan_flops(program: DiffusionProgram) -> dict[str, Any]:
    """Denoiser FLOPs to make one image: every step's variant, twice on guided steps."""
    per_variant = variant_flops(program)
    plan, guided = program.plan, uses_guidance(program.plan, program.spec.conditioning)
    calls = [(plan.variant(i), 2 if guided and plan.guided(i) else 1) for i in range(model_calls(plan))]
    return {
        "per_image": sum(per_variant[v] * k for v, k in calls),
        "per_variant": per_variant,
        "network_evaluations": sum(k for _, k in calls),
    }
