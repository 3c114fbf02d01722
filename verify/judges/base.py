"""What every judge provides: the outputs it applies to, the metrics it gives, and its evaluation of a
candidate's outputs against the original's (the reference, same seeds) and a disjoint draw of the
original (the floor set, other seeds, same conditions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from core.ir import DiffusionProgram

PAIRED, DISTRIBUTION, ADHERENCE = "paired", "distribution", "adherence"


@dataclass(frozen=True)
class Metric:
    key: str  # the verification summary's key, which gates name
    kind: str  # PAIRED (same seeds), DISTRIBUTION (sets of samples) or ADHERENCE (to the condition)
    description: str


@dataclass(frozen=True)
class JudgeOptions:
    """User-supplied feature models (paths the user holds locally), for the judges that need them; a policy's
    environment and how many closed-loop episodes judge it."""

    clip: Path | None = None  # a transformers CLIPModel folder
    inception: Path | None = None  # an Inception-v3 FID state dict (pytorch-fid's pt_inception-2015-12-05)
    episodes: int = 100  # closed-loop episodes of a policy, per program judged
    episode_seed: int | None = None  # their initial states' first seed (default: the closed-loop judge's own)
    environment: str | None = None  # a policy's environment (default: the one it was loaded with)


@dataclass(frozen=True)
class Outputs:
    """One set of final samples with what judges read of them.

    `samples`: model space ([N, C, ...]: pixels, latents, frames); `images`: decoded to the pipeline's
    output in [-1, 1] ([N, C, H, W] or [N, C, F, H, W]; the samples themselves for a pixel model; None
    when the outputs are no images); `conditions`: per sample its class or prompt (None: unconditional).
    `decoded`: the images come from the pipeline's decoder (a latent pipeline). A candidate's set also
    carries its per-step model-output errors on the reference's trajectories, and a policy's, itself as a
    closed-loop policy."""

    samples: torch.Tensor
    images: torch.Tensor | None
    conditions: tuple | None
    decoded: bool = False
    step_errors: Sequence[float] | None = None
    timesteps: Sequence[float] | None = None
    policy: Any = None  # a candidate policy's closed-loop form (core.environments.rollout.Policy)


Evaluate = Callable[[Outputs], dict[str, Any]]


@dataclass(frozen=True)
class FloorFD:
    """A Fréchet distance stated against the original's own seed-to-seed noise: the candidate's FD to
    the floor set vs the reference's FD to the same set (the floor), on the same conditions; and the gated
    measure, the shift (verify.metrics.distribution_shift: the distance beyond the floor, per feature)."""

    prefix: str  # metric keys: {prefix}_shift (+ _mean, _cov), _candidate, _floor, _ratio, _paired
    reference: np.ndarray
    floor: np.ndarray
    floor_fd: float = field(init=False)
    shift: Any = field(init=False)  # verify.metrics.ShiftBasis of the reference and floor sets

    def __post_init__(self) -> None:
        from verify.metrics import ShiftBasis, frechet_distance

        object.__setattr__(self, "floor_fd", frechet_distance(self.reference, self.floor))
        object.__setattr__(self, "shift", ShiftBasis(self.reference, self.floor))

    def __call__(self, candidate: np.ndarray) -> dict[str, float]:
        from verify.metrics import frechet_distance

        if not np.isfinite(candidate).all():  # a diverged candidate
            inf = float("inf")
            keys = ("shift", "shift_mean", "shift_cov", "candidate", "ratio", "paired")
            return {f"{self.prefix}_{k}": inf for k in keys} | {f"{self.prefix}_floor": self.floor_fd}
        fd = frechet_distance(candidate, self.floor)
        mean_term, cov_term = self.shift(candidate)
        return {
            f"{self.prefix}_shift": mean_term + cov_term,
            f"{self.prefix}_shift_mean": mean_term,
            f"{self.prefix}_shift_cov": cov_term,
            f"{self.prefix}_candidate": fd,
            f"{self.prefix}_floor": self.floor_fd,
            f"{self.prefix}_ratio": ratio(fd, self.floor_fd),
            f"{self.prefix}_paired": frechet_distance(candidate, self.reference),
        }


def ratio(value: float, floor: float) -> float:
    """value / floor; a floor of exactly 0 (samples that do not depend on the seed) makes any distance
    infinitely over it, and 0 / 0 is 1."""
    if floor > 0:
        return value / floor
    return 1.0 if value == 0 else float("inf")


def floor_metrics(prefix: str, space: str) -> tuple[Metric, ...]:
    """The metrics of a FloorFD in feature space `space` (words)."""
    return (
        Metric(
            f"{prefix}_shift",
            DISTRIBUTION,
            f"distribution shift: the candidate's Fréchet distance beyond the original's seed-to-seed floor, per"
            f" standardized feature (0: the original's distribution), {space}",
        ),
        Metric(f"{prefix}_shift_mean", DISTRIBUTION, f"the shift's mean term (paired, unbiased), {space}"),
        Metric(f"{prefix}_shift_cov", DISTRIBUTION, f"the shift's covariance term, {space}"),
        Metric(f"{prefix}_ratio", DISTRIBUTION, f"FD of the candidate to the floor set over the floor, {space}"),
        Metric(f"{prefix}_candidate", DISTRIBUTION, f"FD of the candidate to the floor set, {space}"),
        Metric(f"{prefix}_floor", DISTRIBUTION, f"FD of the reference to the floor set (the floor), {space}"),
        Metric(f"{prefix}_paired", PAIRED, f"FD of the candidate to the reference, same seeds, {space}"),
    )


class Judge:
    """A judge: `provides` says which of its metrics it computes for a program (empty: it does not
    apply, `why_not` says why); `prepare` reads the reference and floor sets once and returns the
    evaluation of a candidate's set."""

    name: ClassVar[str]
    applies_to: ClassVar[str]  # the outputs it judges, in words
    metrics: ClassVar[tuple[Metric, ...]]

    def check_options(self, options: JudgeOptions) -> None:
        """Refuse a bad option of this judge's before any work (ConfigError)."""

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        raise NotImplementedError

    def why_not(self, program: DiffusionProgram, options: JudgeOptions) -> str:
        return f"applies to {self.applies_to}"

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        raise NotImplementedError

    def metric_keys(self) -> frozenset[str]:
        return frozenset(m.key for m in self.metrics)
