"""Execute a lowered artifact (plan.json + graphs) with ONNX Runtime: the same loop as the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from optimizer.sampling import sample

from .ort import DEFAULT_PROVIDERS, OrtDenoiser
from .plan import read_plan


class PlanRunner:
    def __init__(self, folder: Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int = 0) -> None:
        self.plan = read_plan(Path(folder))
        self.denoise = OrtDenoiser(self.plan.graph_path("denoiser"), providers, threads)

    def sample(
        self,
        seeds: Sequence[int],
        labels: Sequence[int] | None = None,
        progress: Callable[[Any], Any] = lambda it: it,
    ) -> torch.Tensor:
        return sample(
            self.plan.sampling,
            self.plan.conditioning,
            self.plan.sample_shape,
            self.denoise,
            seeds,
            labels,
            progress=progress,
        )
