"""What every side-by-side command (quant-, cache-, prune-compare) starts from: calibration
trajectories, the evaluation seeds with the original's samples on them, and the verdict: a candidate's
metrics against those samples (the digits classifier judging them where it applies)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from calibration.capture import evaluation_set
from core.ir import DiffusionProgram
from core.stages import decode
from verify.fidelity import DigitsJudge, compare


class Verdict:
    """verify.fidelity.compare of a candidate's finals against the original's, on decoded images for a
    latent pipeline: the original's VAE decodes every candidate (so rows differ by their denoising loop
    alone) and the reference once."""

    def __init__(self, program: DiffusionProgram, reference: Any, judge: DigitsJudge | None) -> None:
        self.reference, self.judge, self.stages = reference, judge, program.stages
        self.reference_images = None if program.stages.vae is None else decode(program.stages, reference.final)

    def __call__(self, final: torch.Tensor, errors: list[float]) -> dict[str, Any]:
        images = None if self.reference_images is None else (self.reference_images, decode(self.stages, final))
        return compare(self.reference, final, errors, self.judge, images=images)


class ComparisonSet(NamedTuple):
    calibration: Any  # calibration.capture.Trajectories, on the calibration seeds
    seeds: list[int]
    conditions: list | None  # per evaluation seed: its class or prompt
    reference: Any  # the original's trajectories on the evaluation seeds
    verdict: Verdict  # candidate finals -> metrics against `reference`


def comparison_set(
    program: DiffusionProgram, samples: int, calibration_samples: int, log: Callable[[str], None]
) -> ComparisonSet:
    from calibration import capture as calib

    log(f"calibration: {calibration_samples} trajectories")
    calibration = calib.capture_calibration(program, calibration_samples)
    seeds, conditions = evaluation_set(program, samples, 0)
    log(f"reference: {samples} samples")
    reference = calib.capture(program, seeds, conditions)
    judge = DigitsJudge.load() if DigitsJudge.applies(program) else None
    return ComparisonSet(calibration, seeds, conditions, reference, Verdict(program, reference, judge))
