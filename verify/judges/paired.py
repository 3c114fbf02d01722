"""Paired metrics on the same seeds: PSNR and SSIM of the decoded outputs (or the samples themselves),
per channel and per frame, and the candidate network's per-step model-output error on the reference's
own trajectories. Applies to every model."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

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
    )

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        return self.metric_keys()

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        ref = to_images(_judged(reference))

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
            return summary

        return evaluate


def _judged(outputs: Outputs):
    """What paired metrics compare: the decoded outputs where the pipeline decodes, else the samples."""
    return outputs.samples if outputs.images is None else outputs.images


JUDGE = PairedJudge()
