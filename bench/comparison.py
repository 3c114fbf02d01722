"""What every side-by-side command (quant-, cache-, prune-compare) starts from: calibration
trajectories, the evaluation seeds with the original's samples on them, and the digits judge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from calibration.capture import evaluation_set
from core.ir import DiffusionProgram
from core.stages import decode
from verify.fidelity import DigitsJudge, compare


class ComparisonSet(NamedTuple):
    calibration: Any  # calibration.capture.Trajectories, on the calibration seeds
    seeds: list[int]
    conditions: list | None  # per evaluation seed: its class or prompt
    reference: Any  # the original's trajectories on the evaluation seeds
    judge: DigitsJudge | None


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
    return ComparisonSet(calibration, seeds, conditions, reference, judge)


def judged(
    program: DiffusionProgram, reference: Any, final: torch.Tensor, errors: list[float], judge: DigitsJudge | None
) -> dict[str, Any]:
    """verify.fidelity.compare of a candidate's finals, on decoded images for a latent pipeline (the
    original's VAE decodes both, so the rows differ by their denoising loop alone)."""
    images = None
    if program.stages.vae is not None:
        images = (decode(program.stages, reference.final), decode(program.stages, final))
    return compare(reference, final, errors, judge, images=images)
