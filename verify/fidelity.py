"""Candidate vs reference on identical seeds, classes, scheduler and steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.ir import DENOISER, Conditioning, DiffusionProgram, SamplingPlan
from core.sampling import (
    ConditionBatch,
    DenoiseFn,
    Variants,
    guide,
    run_variant,
    sample,
    take,
    to_images,
    uses_guidance,
)
from verify.metrics import frechet_distance, psnr, relative_error, ssim


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
    carry, errors = {}, []
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


@dataclass
class DigitsJudge:
    """Agreement with the requested digit (the class, or the digit a prompt names) and Fréchet distance
    with the shipped digits classifier; for prompts also the measured attributes (zoo.attributes).
    Digits-shaped images (decoded, for a latent pipeline) only."""

    classifier: torch.nn.Module
    data_features: np.ndarray

    @staticmethod
    def applies(program: DiffusionProgram) -> bool:
        from core.stages import image_shape
        from zoo.attributes import parse_prompt
        from zoo.data import IMAGE_SIZE, NUM_CLASSES

        if image_shape(program) != (1, IMAGE_SIZE, IMAGE_SIZE):
            return False
        conditioning = program.spec.conditioning
        if conditioning.text:
            return any(parse_prompt(p)[0] is not None for p in program.stages.prompts)
        return conditioning.num_classes == NUM_CLASSES

    @classmethod
    def load(cls) -> DigitsJudge:
        from zoo import load_classifier
        from zoo.data import load_digits16

        classifier = load_classifier()
        images, _ = load_digits16()
        with torch.inference_mode():
            features = classifier.features(images).numpy()
        return cls(classifier, features)

    def judge(self, x: torch.Tensor, conditions: Sequence[Any]) -> tuple[float, np.ndarray, dict[str, float]]:
        """(agreement with the requested digits, features, prompted-attribute rates) for images in [-1, 1]."""
        x = torch.nan_to_num(x, nan=0.0).clamp(-1, 1)  # a diverged sample is judged, not a crash
        with torch.inference_mode():
            features = self.classifier.features(x).numpy()
        if all(isinstance(c, int) for c in conditions):
            with torch.inference_mode():
                predicted = self.classifier(x).argmax(1)
            hits = float((predicted == torch.tensor(list(conditions))).double().mean())
            attributes: dict[str, float] = {}
        else:
            from zoo.attributes import adherence

            rates = adherence(x, list(conditions), self.classifier)
            hits = rates.pop("digit")["rate"] or 0.0
            attributes = {name: r["rate"] for name, r in rates.items() if r["rate"] is not None}
        # Rounded so that "2 of 100" compares equal to a 0.02 bound after subtraction.
        return round(hits, 9), features, attributes


def compare(
    reference: Any,
    candidate_final: torch.Tensor,
    errors: list[float],
    judge: DigitsJudge | None,
    timesteps: Sequence[float] | None = None,
    images: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """All paired and distribution metrics; keys are what gates refer to (see gates.GATES).
    `errors`: the candidate's per-step error on reference trajectories (see step_errors), at `timesteps`
    (default: the reference's own; another loop's when the candidate's loop differs). `images`: the
    (reference, candidate) finals decoded to images in [-1, 1] (a latent pipeline); default: the finals."""
    ref_x, cand_x = images if images is not None else (reference.final, candidate_final)
    ref_img, cand_img = to_images(ref_x), to_images(cand_x)
    p, s = psnr(ref_img, cand_img), ssim(ref_img, cand_img)
    summary: dict[str, Any] = {
        "samples": len(reference.seeds),
        "space": "decoded images" if images is not None else "model output",
        "psnr_db_mean": float(p.mean()),
        "psnr_db_min": float(p.min()),
        "ssim_mean": float(s.mean()),
        "ssim_min": float(s.min()),
        "eps_rel_error_mean": float(np.mean(errors)),
        "eps_rel_error_max": float(np.max(errors)),
        "eps_rel_error_per_step": errors,
        "timesteps": [float(t) for t in (reference.t if timesteps is None else timesteps)],
    }
    if judge is not None and reference.conditions is not None:
        ref_agree, ref_feat, ref_attr = judge.judge(ref_x, reference.conditions)
        cand_agree, cand_feat, cand_attr = judge.judge(cand_x, reference.conditions)
        for name in ref_attr:
            summary[f"attribute_{name}_reference"] = ref_attr[name]
            summary[f"attribute_{name}_candidate"] = cand_attr.get(name)
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
