"""Candidate vs reference on identical seeds, classes, scheduler and steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.ir import DENOISER, Conditioning, ModelSpec, SamplingPlan
from core.sampling import DenoiseFn, Variants, guide, run_variant, to_images, uses_guidance
from verify.metrics import frechet_distance, psnr, relative_error, ssim


def per_step_error(trajectories: Any, denoise: DenoiseFn) -> list[float]:
    """Teacher-forced: the candidate's output on the reference's own inputs at every step."""
    return [
        relative_error(
            trajectories.output[s],
            denoise(trajectories.x[s], trajectories.t[s].expand(trajectories.x.shape[1]), trajectories.labels),
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
    labels, carry, errors = trajectories.labels, {}, []
    for s in range(trajectories.steps):
        use_cfg = guided and plan.guided(s)
        x = trajectories.x[s] if use_cfg or not guided else trajectories.x[s][:n]
        y = labels if labels is None or use_cfg or not guided else labels[:n]
        out, written = run_variant(variants, plan.variant(s), x, trajectories.t[s].expand(x.shape[0]), y, carry)
        carry.update(written)
        reference = guide(trajectories.output[s], plan.guidance_scale, guided)
        errors.append(relative_error(reference, guide(out, plan.guidance_scale, use_cfg)))
    return errors


def step_errors(trajectories: Any, plan: SamplingPlan, conditioning: Conditioning, variants: Variants) -> list[float]:
    """Per-step error of a candidate: raw model outputs for a plain loop, guided predictions otherwise."""
    if plan.guided_steps is None and plan.cache is None:
        return per_step_error(trajectories, lambda x, t, y: run_variant(variants, DENOISER, x, t, y, {})[0])
    return loop_step_error(trajectories, plan, conditioning, variants)


def replay_psnr(program: Any, trajectories: Any, variants: Variants | None = None) -> float:
    """Mean PSNR (dB) of `program`'s samples vs the captured finals, same seeds and classes: the
    end-to-end check loop-level passes run on the calibration set."""
    from core.sampling import sample
    from core.variants import torch_loop

    spec = program.spec
    final = sample(
        program.plan,
        spec.conditioning,
        spec.sample_shape,
        variants or torch_loop(program),
        trajectories.seeds,
        trajectories.classes,
    )
    return float(psnr(to_images(trajectories.final), to_images(final)).mean())


@dataclass
class DigitsJudge:
    """Class agreement and Fréchet distance with the shipped digits classifier (digits-shaped models only)."""

    classifier: torch.nn.Module
    data_features: np.ndarray

    @staticmethod
    def applies(spec: ModelSpec) -> bool:
        from zoo.data import IMAGE_SIZE, NUM_CLASSES

        return tuple(spec.sample_shape) == (1, IMAGE_SIZE, IMAGE_SIZE) and spec.conditioning.num_classes == NUM_CLASSES

    @classmethod
    def load(cls) -> DigitsJudge:
        from zoo import load_classifier
        from zoo.data import load_digits16

        classifier = load_classifier()
        images, _ = load_digits16()
        with torch.inference_mode():
            features = classifier.features(images).numpy()
        return cls(classifier, features)

    def judge(self, x: torch.Tensor, classes: Sequence[int]) -> tuple[float, np.ndarray]:
        """(agreement with the requested classes, features) for model-space samples."""
        with torch.inference_mode():
            x = torch.nan_to_num(x, nan=0.0).clamp(-1, 1)  # a diverged sample is judged, not a crash
            predicted = self.classifier(x).argmax(1)
            features = self.classifier.features(x).numpy()
        # Rounded so that "2 of 100" compares equal to a 0.02 bound after subtraction.
        agreement = round(float((predicted == torch.tensor(list(classes))).double().mean()), 9)
        return agreement, features


def compare(
    reference: Any,
    candidate_final: torch.Tensor,
    errors: list[float],
    judge: DigitsJudge | None,
    timesteps: Sequence[float] | None = None,
) -> dict[str, Any]:
    """All paired and distribution metrics; keys are what gates refer to (see gates.GATES).
    `errors`: the candidate's per-step error on reference trajectories (see step_errors), at `timesteps`
    (default: the reference's own; another loop's when the candidate's loop differs)."""
    ref_img, cand_img = to_images(reference.final), to_images(candidate_final)
    p, s = psnr(ref_img, cand_img), ssim(ref_img, cand_img)
    summary: dict[str, Any] = {
        "samples": len(reference.seeds),
        "psnr_db_mean": float(p.mean()),
        "psnr_db_min": float(p.min()),
        "ssim_mean": float(s.mean()),
        "ssim_min": float(s.min()),
        "eps_rel_error_mean": float(np.mean(errors)),
        "eps_rel_error_max": float(np.max(errors)),
        "eps_rel_error_per_step": errors,
        "timesteps": [float(t) for t in (reference.t if timesteps is None else timesteps)],
    }
    if judge is not None and reference.classes is not None:
        ref_agree, ref_feat = judge.judge(reference.final, reference.classes)
        cand_agree, cand_feat = judge.judge(candidate_final, reference.classes)
        fd_ref, fd_cand = (
            frechet_distance(ref_feat, judge.data_features),
            frechet_distance(cand_feat, judge.data_features),
        )
        summary.update(
            {
                "class_agreement_reference": ref_agree,
                "class_agreement_candidate": cand_agree,
                "class_agreement_drop": round(ref_agree - cand_agree, 9),
                "fd_reference_to_data": fd_ref,
                "fd_candidate_to_data": fd_cand,
                "fd_increase": fd_cand - fd_ref,
                "fd_candidate_to_reference": frechet_distance(cand_feat, ref_feat),
            }
        )
    return summary
