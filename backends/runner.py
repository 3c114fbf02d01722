"""Execute a lowered artifact (plan.json + graphs) on any graph runtime: the same loop as the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from core.errors import LoadError
from core.sampling import Variants, sample

from .plan import read_plan


class Graph(Protocol):
    """One executable graph: (sample, timestep, [class_labels], carried tensors...) -> (output, carried...)."""

    input_names: list[str]
    output_names: list[str]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...

    def step(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, carry: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class PlanRunner:
    """The loop of plan.json over graphs opened by a backend's `open_graph(path)`."""

    def __init__(self, folder: Path, open_graph: Callable[[Path], Graph], describe: dict[str, Any]) -> None:
        self.plan = read_plan(Path(folder))
        self.graphs = {name: open_graph(self.plan.graph_path(name)) for name in self.plan.document["graphs"]}
        for name, graph in self.graphs.items():
            recorded = self.plan.document["graphs"][name]
            if graph.input_names != recorded["inputs"] or graph.output_names != recorded["outputs"]:
                raise LoadError(f"{self.plan.folder}: graph '{name}' inputs/outputs differ from what plan.json records")
        self.loop: Variants = {name: graph.step for name, graph in self.graphs.items()}
        # The graph of step 0 (a full network evaluation) as a plain denoise function.
        self.denoise = self.graphs[self.plan.sampling.variant(0)]
        self._describe = describe

    def describe(self) -> dict[str, Any]:
        """The backend's description and what the runtime chose for the graphs (e.g. providers)."""
        return {**self._describe, **self.denoise.describe()}

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
