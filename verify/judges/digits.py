"""The zoo's own judge: the shipped digits classifier (zoo/weights/classifier-digits) on 1x16x16 digit
images (decoded, for a latent pipeline): agreement with the requested digit (the class, or the digit a
prompt names) and the prompted attributes' rates (zoo.attributes); Fréchet distance in its feature space
against the original's floor, and to the training data (reported)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from core.ir import DiffusionProgram
from verify.judges.base import (
    ADHERENCE,
    DISTRIBUTION,
    Evaluate,
    FloorFD,
    Judge,
    JudgeOptions,
    Metric,
    Outputs,
    floor_metrics,
)
from verify.metrics import frechet_distance

PREFIX = "fd_digits"


class DigitsModel:
    """The classifier and the training data's features."""

    def __init__(self) -> None:
        from zoo import load_classifier
        from zoo.data import load_digits16

        self.classifier = load_classifier()
        images, _ = load_digits16()
        with torch.inference_mode():
            self.data_features = self.classifier.features(images).numpy()

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


class DigitsJudge(Judge):
    name = "digits"
    applies_to = "the zoo's 1x16x16 digit images (classes 0-9, or prompts naming a digit)"
    metrics: ClassVar = (
        Metric("class_agreement_drop", ADHERENCE, "drop of the classifier's agreement with the requested digit"),
        Metric("class_agreement_reference", ADHERENCE, "the reference's agreement with the requested digit"),
        Metric("class_agreement_candidate", ADHERENCE, "the candidate's agreement with the requested digit"),
        *floor_metrics(PREFIX, "in the digits classifier's features"),
        Metric("fd_reference_to_data", DISTRIBUTION, "FD of the reference to the digits data (classifier features)"),
        Metric("fd_candidate_to_data", DISTRIBUTION, "FD of the candidate to the digits data (classifier features)"),
    )

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        from core.stages import image_shape
        from zoo.attributes import parse_prompt
        from zoo.data import IMAGE_SIZE, NUM_CLASSES

        if image_shape(program) != (1, IMAGE_SIZE, IMAGE_SIZE):
            return frozenset()
        conditioning = program.spec.conditioning
        if conditioning.text:
            named = any(parse_prompt(p)[0] is not None for p in program.stages.prompts)
            return self.metric_keys() if named else frozenset()
        return self.metric_keys() if conditioning.num_classes == NUM_CLASSES else frozenset()

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        model = DigitsModel()
        conditions: Any = reference.conditions  # the judge applies to conditioned digit models only
        ref_agree, ref_feat, ref_attr = model.judge(reference.images, conditions)
        fd = FloorFD(PREFIX, ref_feat, model.judge(floor.images, conditions)[1])
        fd_ref_data = frechet_distance(ref_feat, model.data_features)

        def evaluate(candidate: Outputs) -> dict[str, Any]:
            agree, features, attributes = model.judge(candidate.images, conditions)
            summary: dict[str, Any] = {}
            for name in ref_attr:
                summary[f"attribute_{name}_reference"] = ref_attr[name]
                summary[f"attribute_{name}_candidate"] = attributes.get(name)
            return (
                summary
                | fd(features)
                | {
                    "class_agreement_reference": ref_agree,
                    "class_agreement_candidate": agree,
                    "class_agreement_drop": round(ref_agree - agree, 9),
                    "fd_reference_to_data": fd_ref_data,
                    "fd_candidate_to_data": frechet_distance(features, model.data_features),
                }
            )

        return evaluate


JUDGE = DigitsJudge()
