"""Choose the denoiser inputs a quantizer calibrates on.

- "timestep": stratified over the sampling steps the plan actually runs: every step gets an equal share
  of rows from the captured trajectories (the inputs the model really sees, at the times it sees them).
- "skewed": PTQ4DM's choice: steps drawn with weights from a normal over t/T (mean `skew_mean`),
  leaning towards the low-noise end where errors survive to the final image.
- "random": the naive baseline (Olive's Stable Diffusion recipe, ORT's examples): x ~ N(0, I), t uniform
  over the training range, random labels (text models: random captured prompt rows); nothing else from the
  real trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import ConfigError
from core.sampling import take

from .capture import Trajectories

METHODS = ("timestep", "skewed", "random")


@dataclass(frozen=True)
class CalibrationInputs:
    x: torch.Tensor  # [M, C, H, W]
    t: torch.Tensor  # [M] float32
    cond: dict[str, torch.Tensor]  # name -> [M, ...] condition tensors ({} for an unconditional model)
    steps: torch.Tensor  # [M] index of the plan step each row comes from (-1: synthetic)

    def batches(self, size: int):
        for i in range(0, self.x.shape[0], size):
            rows = slice(i, i + size)
            yield self.x[rows], self.t[rows], take(self.cond, rows)

    def rows(self, pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return self.x[pick], self.t[pick], take(self.cond, pick)

    @staticmethod
    def concat(parts: list[CalibrationInputs]) -> CalibrationInputs:
        cond = {k: torch.cat([p.cond[k] for p in parts]) for k in parts[0].cond}
        return CalibrationInputs(
            torch.cat([p.x for p in parts]), torch.cat([p.t for p in parts]), cond, torch.cat([p.steps for p in parts])
        )


def step_weights(t: torch.Tensor, method: str, num_train_timesteps: int, skew_mean: float = 0.4) -> torch.Tensor:
    if method == "timestep":
        return torch.full_like(t, 1.0 / len(t))
    w = torch.exp(-0.5 * ((t / num_train_timesteps - skew_mean) / 0.25) ** 2)
    return w / w.sum()


def allocate(weights: torch.Tensor, count: int) -> list[int]:
    """Integer rows per step proportional to `weights` (largest remainder), summing to `count`."""
    raw = weights * count
    rows = raw.floor().long()
    for i in torch.argsort(raw - rows, descending=True)[: count - int(rows.sum())]:
        rows[i] += 1
    return rows.tolist()


def select(
    traj: Trajectories,
    method: str,
    count: int,
    generator: torch.Generator,
    num_train_timesteps: int = 1000,
    num_classes: int = 0,
) -> CalibrationInputs:
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
    if count < 1:
        raise ConfigError("calibration needs at least one input")
    if method == "random":
        return _random_inputs(traj, count, generator, num_train_timesteps, num_classes)
    rows = traj.x.shape[1]
    parts = []
    for s, k in enumerate(allocate(step_weights(traj.t, method, num_train_timesteps), count)):
        if k == 0:
            continue
        pick = torch.randperm(rows, generator=generator)[: min(k, rows)]
        if k > rows:  # more rows wanted than captured: repeat the step's rows
            pick = torch.cat([pick, torch.randint(rows, (k - rows,), generator=generator)])
        t = traj.t[s].expand(len(pick)).float()
        parts.append(CalibrationInputs(traj.x[s, pick], t, take(traj.cond, pick), torch.full((len(pick),), s)))
    return CalibrationInputs.concat(parts)


def _random_inputs(
    traj: Trajectories, count: int, generator: torch.Generator, num_train_timesteps: int, num_classes: int
) -> CalibrationInputs:
    x = torch.randn((count, *traj.x.shape[2:]), generator=generator)
    t = torch.randint(num_train_timesteps, (count,), generator=generator).float()
    cond = {}
    for name, captured in traj.cond.items():
        if name == "class_labels":
            top = max(num_classes, int(captured.max()) + 1)  # the null class too, when the model has one
            cond[name] = torch.randint(top, (count,), generator=generator)
        else:  # text: random rows of the captured prompt encodings
            cond[name] = captured[torch.randint(captured.shape[0], (count,), generator=generator)]
    return CalibrationInputs(x, t, cond, torch.full((count,), -1))
