"""Error budgets and the greedy fallback: the error a quantized network is held to (teacher-forced per step, or
end to end on the loop's samples), each layer's sensitivity (its error when quantized alone, on a few steps),
and layers reverted to fp32, most sensitive first, while a judge (the error budget, or the distribution
check) is over its bound."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.adapters import Denoiser
from core.conditions import encode
from core.ir import DiffusionProgram
from core.quantized import quantized_layers
from core.sampling import take
from core.surgery import set_module
from core.variants import torch_loop
from verify.fidelity import per_step_error, replay_error

if TYPE_CHECKING:
    from verify.floor_check import FloorCheck


@dataclass(frozen=True)
class ErrorMeasure:
    """What the fallback keeps within budget: `measure` on `rows` (the calibration rows it checks), each
    option's solo error on `probe` (fewer steps, when a step can be measured alone)."""

    name: str
    budget: float
    measure: Callable[[Any], float]
    rows: Any
    probe: Any


ROWS = 16  # calibration rows (or seeds) on which errors are measured


def error_measure(
    quantized: DiffusionProgram, denoiser: Denoiser, traj: Any, max_eps_error: float, max_sample_error: float
) -> ErrorMeasure:
    """Teacher-forced per step (max_eps_error), or end to end on the loop's samples (max_sample_error)."""
    if not max_sample_error:
        rows = _subset(traj, ROWS)
        name = "teacher-forced model-output error on calibration trajectories"
        measure: Callable[[Any], float] = functools.partial(_eps_error, denoiser)
        return ErrorMeasure(name, max_eps_error, measure, rows, _steps_subset(rows, SENSITIVITY_STEPS))
    seeds = _seeds_subset(traj, ROWS)
    loop, batch = torch_loop(quantized), encode(quantized, seeds.conditions, len(seeds.seeds))
    name = "end-to-end error of the loop's samples on calibration seeds (free-running)"
    measure = lambda t: replay_error(quantized, t, loop, batch)  # noqa: E731
    return ErrorMeasure(name, max_sample_error, measure, seeds, seeds)


def _seeds_subset(traj: Any, rows: int) -> Any:
    """The trajectories' first `rows` seeds with their conditions and finals (what a replay needs)."""
    n = min(rows, len(traj.seeds))
    conditions = None if traj.conditions is None else traj.conditions[:n]
    return dataclasses.replace(traj, seeds=traj.seeds[:n], conditions=conditions, final=traj.final[:n])


def _subset(traj: Any, rows: int) -> Any:
    """The calibration trajectories on `rows` evenly spread rows (both guidance halves), for quick checks."""
    n = traj.x.shape[1]
    pick = torch.linspace(0, n - 1, min(rows, n)).round().long()
    return dataclasses.replace(traj, x=traj.x[:, pick], output=traj.output[:, pick], cond=take(traj.cond, pick))


def _steps_subset(traj: Any, steps: int) -> Any:
    """The trajectories at `steps` evenly spread steps (first and last included)."""
    pick = torch.linspace(0, traj.steps - 1, min(steps, traj.steps)).round().long().unique()
    return dataclasses.replace(traj, x=traj.x[pick], t=traj.t[pick], output=traj.output[pick])


def _eps_error(denoiser: Denoiser, traj: Any) -> float:
    """Mean over steps of the teacher-forced relative error of the model output."""
    errors = per_step_error(traj, torch.no_grad()(denoiser.apply))
    return sum(errors) / len(errors)


SENSITIVITY_STEPS = 5  # steps of the loop on which each layer's solo error is measured


def sensitivity_ranking(model: nn.Module, measured: ErrorMeasure, progress: Any) -> dict[str, float]:
    """Each quantized layer's error when it alone is quantized (on the probe): the fallback's order."""
    layers = quantized_layers(model)
    for layer in layers.values():
        layer.emulate = False
    solo = {}
    for name, layer in progress(layers.items(), desc="quantize: layer sensitivity", leave=False):
        layer.emulate = True
        solo[name] = measured.measure(measured.probe)  # the ranking only; the budget is checked on all rows
        layer.emulate = False
    for layer in layers.values():
        layer.emulate = True
    return solo


class ErrorJudge:
    """The fallback's condition for an error budget: the error on every row over it."""

    def __init__(self, measured: ErrorMeasure, value: float) -> None:
        self.measured, self.value = measured, value

    def over(self) -> bool:
        return self.value > self.measured.budget

    def after_revert(self) -> dict[str, float]:
        self.value = self.measured.measure(self.measured.rows)
        return {"error_after": self.value}


class ShiftJudge:
    """The fallback's condition for the distribution check: the quantized program's shift beyond its input's."""

    def __init__(self, check: FloorCheck, quantized: DiffusionProgram, added: float, before: float) -> None:
        self.check, self.quantized, self.added, self.before = check, quantized, added, before
        self.first = self.value = check.shift(quantized)

    def over(self) -> bool:
        return self.value - self.before > self.added

    def after_revert(self) -> dict[str, float]:
        self.value = self.check.shift(self.quantized)  # the model is reverted in place
        return {"fd_shift_after": self.value}

    def summary(self, reverted: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "input_shift": self.before,
            "quantized_shift": self.first,
            "final_shift": self.value,
            "max_added": self.added,
            "held": not self.over(),
            "floor_fd": self.check.floor,
            "reverted": reverted,
        }


def revert_most_sensitive(
    model: nn.Module, original: nn.Module, ranking: dict[str, float], limit: int, judge: ErrorJudge | ShiftJudge
) -> list[dict[str, Any]]:
    """Revert the layers still quantized, most sensitive first (`ranking`), to fp32 while `judge` is over
    its bound, at most `limit` of them."""
    quantized = quantized_layers(model)
    reverted: list[dict[str, Any]] = []
    for name in sorted((n for n in ranking if n in quantized), key=lambda n: ranking[n], reverse=True):
        if len(reverted) >= limit or not judge.over():
            break
        set_module(model, name, copy.deepcopy(original.get_submodule(name)))
        reverted.append({"layer": name, "solo_error": ranking[name], **judge.after_revert()})
    return reverted
