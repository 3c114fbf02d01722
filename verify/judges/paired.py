"""Paired metrics on the same seeds: PSNR and SSIM of the decoded outputs (or the samples themselves),
per channel and per frame, and the candidate network's per-step model-output error on the reference's
own trajectories. Applies to every model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from core.ir import DiffusionProgram
from core.pixels import to_images
from verify.judges.base import PAIRED, Evaluate, Judge, JudgeOptions, Metric, Outputs
from verify.metrics import psnr, psnr_per_frame, ssim_per_channel

VIDEO_RANK = 5  # [N, C, F, H, W]


class PairedJudge(Judge):
    name = "paired"
    applies_to = "every output (decoded images, video frames, latents, 1-D signals)"
    metrics: ClassVar = (
        Metric("psnr_db_mean", PAIRED, "mean PSNR of the final outputs vs the reference (dB; per frame for video)"),
        Metric("psnr_db_min", PAIRED, "worst sample's PSNR (dB)"),
        Metric("ssim_mean", PAIRED, "mean SSIM (per channel, per frame)"),
        Metric("ssim_min", PAIRED, "worst sample's SSIM"),
        Metric("eps_rel_error_mean", PAIRED, "mean per-step model-output relative error on the reference's inputs"),
        Metric("eps_rel_error_max", PAIRED, "worst per-step model-output relative error on the reference's inputs"),
        Metric(
            "action_rmse_mean",
            PAIRED,
            "policies: mean per-chunk RMS difference of the actions from the reference's (the environment's units)",
        ),
        Metric(
            "action_rmse_floor",
            PAIRED,
            "policies: the same between the original on two noise seeds for each observation (its own spread)",
        ),
    )

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        if program.spec.chunking is None:
            return self.metric_keys() - ACTION_METRICS
        return self.metric_keys()

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        ref = to_images(_judged(reference))
        actions = _actions(program)
        action_floor = None if actions is None else _rmse(actions(reference.samples), actions(floor.samples))

        def evaluate(candidate: Outputs) -> dict[str, Any]:
            cand = to_images(_judged(candidate))
            p = psnr_per_frame(ref, cand) if ref.dim() == VIDEO_RANK else psnr(ref, cand)
            s = ssim_per_channel(ref, cand)
            summary: dict[str, Any] = {
                "space": "decoded images" if reference.decoded else "model output",
                "psnr_db_mean": float(p.mean()),
                "psnr_db_min": float(p.min()),
                "ssim_mean": float(s.mean()),
                "ssim_min": float(s.mean(1).min()),
                "ssim_per_channel": [float(v) for v in s.mean(0)],
            }
            errors = candidate.step_errors
            if errors:
                summary.update(
                    eps_rel_error_mean=float(np.mean(errors)),
                    eps_rel_error_max=float(np.max(errors)),
                    eps_rel_error_per_step=[float(e) for e in errors],
                    timesteps=[float(t) for t in candidate.timesteps or ()],
                )
            if actions is not None:
                summary.update(
                    action_rmse_mean=_rmse(actions(reference.samples), actions(candidate.samples)),
                    action_rmse_floor=action_floor,
                )
            return summary

        return evaluate


ACTION_METRICS = frozenset({"action_rmse_mean", "action_rmse_floor"})


def _actions(program: DiffusionProgram) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A policy's chunks in the environment's units (its output stage un-normalizes them); None for others."""
    if program.spec.chunking is None:
        return None
    norm = program.spec.output_normalization
    return (lambda x: x.double()) if norm is None else (lambda x: norm.denormalize(x).double())


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).flatten(1).mean(1).sqrt().mean())


def _judged(outputs: Outputs):
    """What paired metrics compare: the decoded outputs where the pipeline decodes, else the samples."""
    return outputs.samples if outputs.images is None else outputs.images


JUDGE = PairedJudge()
