"""Execute a lowered artifact (plan.json + graphs) with ONNX Runtime: the same loop as the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from optimizer.errors import LoadError
from optimizer.sampling import Variants, sample

from .ort import DEFAULT_PROVIDERS, OrtDenoiser
from .plan import read_plan


class PlanRunner:
    def __init__(self, folder: Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int = 0) -> None:
        self.plan = read_plan(Path(folder))
        self.graphs = {
            name: OrtDenoiser(self.plan.graph_path(name), providers, threads) for name in self.plan.document["graphs"]
        }
        for name, graph in self.graphs.items():
            recorded = self.plan.document["graphs"][name]
            if graph.input_names != recorded["inputs"] or graph.output_names != recorded["outputs"]:
                raise LoadError(f"{self.plan.folder}: graph '{name}' inputs/outputs differ from what plan.json records")
        self.loop: Variants = {name: graph.step for name, graph in self.graphs.items()}
        # The graph of step 0 (a full network evaluation) as a plain denoise function.
        self.denoise = self.graphs[self.plan.sampling.variant(0)]

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
            self.loop,
            seeds,
            labels,
            progress=progress,
        )
