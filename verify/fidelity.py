"""Candidate vs reference on identical seeds and conditions: per-step model-output errors on the reference's
trajectories, and free-running replays of a program on them (the checks passes run on calibration)."""

from __future__ import annotations

from typing import Any

import torch

from core.ir import DENOISER, Conditioning, SamplingPlan
from core.pixels import to_images
from core.sampling import ConditionBatch, DenoiseFn, Variants, guide, run_variant, sample, take, uses_guidance
from verify.metrics import psnr, relative_error


def per_step_error(trajectories: Any, denoise: DenoiseFn) -> list[float]:
    """Teacher-forced: the candidate's output on the reference's own inputs at every step."""
    return [
        relative_error(
            trajectories.output[s],
            denoise(trajectories.x[s], trajectories.t[s].expand(trajectories.x.shape[1]), trajectories.cond),
        )
        for s in range(trajectories.steps)
    ]


def loop_step_error(
    trajectories: Any, plan: SamplingPlan, conditioning: Conditioning, variants: Variants
) -> list[float]:
    """Teacher-forced for a loop with a guidance policy or cache: at every step the candidate's
    prediction (after guidance, as the scheduler consumes it) on the reference's own input, its
    cached tensors carried from its refresh steps on those inputs, vs the reference's prediction."""
    guided = uses_guidance(plan, conditioning)
    n = len(trajectories.seeds)
    carry: dict[str, torch.Tensor] = {}
    errors: list[float] = []
    for s in range(trajectories.steps):
        use_cfg = guided and plan.guided(s)
        x = trajectories.x[s] if use_cfg or not guided else trajectories.x[s][:n]
        cond = take(trajectories.cond, slice(0, x.shape[0]))
        out, written = run_variant(variants, plan.variant(s), x, trajectories.t[s].expand(x.shape[0]), cond, carry)
        carry.update(written)
        reference = guide(trajectories.output[s], plan.guidance_scale, guided)
        errors.append(relative_error(reference, guide(out, plan.guidance_scale, use_cfg)))
    return errors


def step_errors(trajectories: Any, plan: SamplingPlan, conditioning: Conditioning, variants: Variants) -> list[float]:
    """Per-step error of a candidate: raw model outputs for a plain loop, guided predictions otherwise."""
    if plan.guided_steps is None and plan.cache is None:
        return per_step_error(trajectories, lambda x, t, y: run_variant(variants, DENOISER, x, t, y, {})[0])
    return loop_step_error(trajectories, plan, conditioning, variants)


def replay(
    program: Any, trajectories: Any, variants: Variants | None = None, batch: ConditionBatch | None = None
) -> torch.Tensor:
    """`program`'s samples (free-running, its own loop) on the trajectories' seeds and conditions (`batch`:
    their tensors, when already encoded)."""
    from core.conditions import encode
    from core.variants import torch_loop

    seeds = trajectories.seeds
    batch = batch or encode(program, trajectories.conditions, len(seeds))
    return sample(program.plan, program.spec.sample_shape, variants or torch_loop(program), seeds, batch)


def replay_psnr(program: Any, trajectories: Any, variants: Variants | None = None) -> float:
    """Mean PSNR (dB) of `program`'s samples vs the captured finals, same seeds and conditions: the
    end-to-end check loop-level passes run on the calibration set."""
    final = replay(program, trajectories, variants)
    return float(psnr(to_images(trajectories.final), to_images(final)).mean())


def replay_error(
    program: Any, trajectories: Any, variants: Variants | None = None, batch: ConditionBatch | None = None
) -> float:
    """Relative error of `program`'s samples vs the captured finals, same seeds and conditions: errors that
    compound along the loop count, which a teacher-forced per-step error does not see."""
    return relative_error(trajectories.final, replay(program, trajectories, variants, batch))
