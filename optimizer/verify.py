"""Candidate vs reference on identical seeds, classes, scheduler and steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .ir import ModelSpec
from .metrics import frechet_distance, psnr, relative_error, ssim
from .sampling import DenoiseFn, to_images


def evaluation_set(n: int, num_classes: int, base_seed: int) -> tuple[list[int], list[int] | None]:
    """Seeds base_seed.. and, for class-conditional models, classes cycling 0..num_classes-1."""
    seeds = list(range(base_seed, base_seed + n))
    return seeds, ([i % num_classes for i in range(n)] if num_classes else None)


def per_step_error(trajectories: Any, denoise: DenoiseFn) -> list[float]:
    """Teacher-forced: the candidate's output on the reference's own inputs at every step."""
    return [
        relative_error(
            trajectories.output[s],
            denoise(trajectories.x[s], trajectories.t[s].expand(trajectories.x.shape[1]), trajectories.labels),
        )
        for s in range(trajectories.steps)
    ]


@dataclass
class DigitsJudge:
    """Class agreement and Fréchet distance with the shipped digits classifier (digits-shaped models only)."""

    classifier: torch.nn.Module
    data_features: np.ndarray

    @staticmethod
    def applies(spec: ModelSpec) -> bool:
        from .zoo.data import IMAGE_SIZE, NUM_CLASSES

        return tuple(spec.sample_shape) == (1, IMAGE_SIZE, IMAGE_SIZE) and spec.conditioning.num_classes == NUM_CLASSES

    @classmethod
    def load(cls) -> DigitsJudge:
        from .zoo import load_classifier
        from .zoo.data import load_digits16

        classifier = load_classifier()
        images, _ = load_digits16()
        with torch.inference_mode():
            features = classifier.features(images).numpy()
        return cls(classifier, features)

    def judge(self, x: torch.Tensor, classes: Sequence[int]) -> tuple[float, np.ndarray]:
        """(agreement with the requested classes, features) for model-space samples."""
        with torch.inference_mode():
            x = x.clamp(-1, 1)
            predicted = self.classifier(x).argmax(1)
            features = self.classifier.features(x).numpy()
        agreement = float((predicted == torch.tensor(list(classes))).float().mean())
        return agreement, features


def compare(
    reference: Any,
    candidate_final: torch.Tensor,
    candidate_denoise: DenoiseFn,
    judge: DigitsJudge | None,
) -> dict[str, Any]:
    """All paired and distribution metrics; keys are what gates refer to (see gates.GATES)."""
    ref_img, cand_img = to_images(reference.final), to_images(candidate_final)
    p, s = psnr(ref_img, cand_img), ssim(ref_img, cand_img)
    errors = per_step_error(reference, candidate_denoise)
    summary: dict[str, Any] = {
        "samples": len(reference.seeds),
        "psnr_db_mean": float(p.mean()),
        "psnr_db_min": float(p.min()),
        "ssim_mean": float(s.mean()),
        "ssim_min": float(s.min()),
        "eps_rel_error_mean": float(np.mean(errors)),
        "eps_rel_error_max": float(np.max(errors)),
        "eps_rel_error_per_step": errors,
        "timesteps": [float(t) for t in reference.t],
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
                "class_agreement_drop": ref_agree - cand_agree,
                "fd_reference_to_data": fd_ref,
                "fd_candidate_to_data": fd_cand,
                "fd_increase": fd_cand - fd_ref,
                "fd_candidate_to_reference": frechet_distance(cand_feat, ref_feat),
            }
        )
    return summary
