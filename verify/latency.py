"""Latency, measured side by side: the original in torch and the artifact on its backend, interleaved."""

from __future__ import annotations

import functools
from typing import Any

import torch

from calibration.capture import evaluation_set
from core.adapters import torch_denoise
from core.conditions import encode, example_conditions
from core.ir import DiffusionProgram
from core.sampling import sample, uses_guidance
from verify.timing import paired_median_ms


def measure_latency(
    program: DiffusionProgram,
    runner: Any,
    repeats: int,
    baseline: Any | None = None,
    images: int = 1,
) -> dict[str, Any]:
    """`images` images: a denoiser call (their guided batch) and a whole sampling run, interleaved side by side:
    the original in torch, the artifact on its backend (`runner`, a backends.registry.Runner) and, when
    passes changed the network, the unoptimized fp32 graph on the same backend (`baseline`: the fair
    baseline for speed and size). Keys keep the names "ort"/"ort_fp32" of report.json."""
    spec, plan = program.spec, program.plan
    batch = images * (2 if uses_guidance(plan, spec.conditioning) else 1)
    x = torch.randn(batch, *spec.sample_shape)
    t = torch.full((batch,), 500.0)
    cond = example_conditions(spec.conditioning, batch)
    seeds, conditions = evaluation_set(program, images, 0)
    ref = torch_denoise(program)
    contenders = {"torch": ref, "ort": runner.denoise}
    if baseline is not None:
        contenders["ort_fp32"] = baseline.denoise
    step = paired_median_ms({k: functools.partial(f, x, t, cond) for k, f in contenders.items()}, repeats)
    batch_in = encode(program, conditions, images)
    loops = {
        "torch": lambda: sample(plan, spec.sample_shape, ref, seeds, batch_in),
        "ort": lambda: runner.sample(seeds, conditions),
    }
    if baseline is not None:
        loops["ort_fp32"] = lambda: baseline.sample(seeds, conditions)
    e2e = paired_median_ms(loops, max(1, repeats // 4), 1)
    result: dict[str, Any] = {
        "images": images,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "providers": runner.describe().get("providers", []),
    }
    for key in contenders:
        result[f"{key}_per_step_ms"] = step[key]
        result[f"{key}_end_to_end_ms"] = e2e[key]
    return result
