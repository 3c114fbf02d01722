"""What every side-by-side command (quant-, cache-, prune-compare) starts from: calibration
trajectories, the evaluation seeds with the original's samples on them, and the verdict: a candidate's
metrics against those samples and the original's floor set (every judge that applies to the model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from calibration.capture import evaluation_set
from core.ir import DiffusionProgram
from verify.verdict import Verdict


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
    log(f"floor set: the original on {samples} other seeds")
    return ComparisonSet(calibration, seeds, conditions, reference, Verdict.for_program(program, reference))
