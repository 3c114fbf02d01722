"""Execute a lowered artifact (plan.json + graphs) on any graph runtime: the same loop as the reference."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from core.conditions import class_batch, observation_batch, prompt_batch
from core.errors import LoadError
from core.ir import SamplingPlan
from core.sampling import ConditionBatch, Variants, sample

from .onnx_export import LOOP_INPUTS
from .pipeline_stages import StageRunner
from .plan import read_plan


class Graph(Protocol):
    """One executable graph: (sample, timestep, condition tensors..., carried tensors...) -> (output, carried...)."""

    input_names: list[str]
    output_names: list[str]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...

    def step(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor], carry: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class LoopGraph:
    """A Graph over any runtime: builds the loop's feeds (sample, timestep, condition tensors, carried
    tensors) and splits the outputs into model output and carried tensors. A runtime implements `run`.
    `condition_names`: which inputs are condition tensors; the other non-loop inputs are carried tensors."""

    def __init__(self, input_names: list[str], output_names: list[str], condition_names: tuple[str, ...]) -> None:
        self.input_names, self.output_names = input_names, output_names
        self.condition_names = condition_names
        self.carried_in = [n for n in input_names if n not in (*LOOP_INPUTS, *condition_names)]

    def run(self, feeds: dict[str, torch.Tensor], outputs: list[str]) -> list[torch.Tensor]:
        """The graph's `outputs` (a prefix of output_names) for `feeds` (every input, by name)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}

    def _feeds(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sample": x.float(), "timestep": t.float(), **{n: cond[n] for n in self.condition_names}}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.carried_in:
            raise ValueError(f"this graph also needs carried tensors {self.carried_in}; call step()")
        return self.run(self._feeds(x, t, cond), self.output_names[:1])[0]

    def step(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor], carry: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A loop variant (see core.sampling.StepFn)."""
        feeds = self._feeds(x, t, cond) | {n: carry[n] for n in self.carried_in}
        out, *written = self.run(feeds, self.output_names)
        return out, dict(zip(self.output_names[1:], written, strict=True))


class PlanRunner:
    """The loop of plan.json over graphs opened by a backend's `open_graph(path, condition_names)`."""

    def __init__(
        self,
        folder: Path,
        open_graph: Callable[[Path, tuple[str, ...]], Graph],
        describe: dict[str, Any],
        open_stage: Callable[[Path], Callable[[dict[str, Any]], list[Any]]],
        files: bool = True,
    ) -> None:
        """`open_stage(path)`: a stage graph as a callable {input name: array} -> [output arrays].
        `files=False`: the graph files are not in `folder` (see read_plan); `open_graph` reaches them."""
        self.plan = read_plan(Path(folder), files)
        self.stages = StageRunner(self.plan.folder, self.plan.stages, self.plan.document["model"]["class"], open_stage)
        names = self.plan.conditioning.input_names
        self.graphs = {name: open_graph(self.plan.graph_path(name), names) for name in self.plan.document["graphs"]}
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

    def encode(self, conditions: Sequence[Any] | None, n: int) -> ConditionBatch:
        """The condition tensors of n samples: class labels, prompts through the prompt encoder graph, or
        raw observations normalized as plan.json's conditioning says."""
        conditioning = self.plan.conditioning
        if conditioning.text:
            return prompt_batch(conditioning, conditions, n, self.stages.encode, self.stages.zero_uncond)
        if conditioning.observation:
            return observation_batch(conditioning, conditions, n)
        return class_batch(conditioning, conditions, n)

    def decode(self, final: torch.Tensor) -> torch.Tensor:
        """Final samples -> the pipeline's output: images in [-1, 1] (through the decoder graph of a latent
        pipeline), actions (un-normalized), or the samples unchanged."""
        if self.plan.output_normalization is not None:
            return self.plan.output_normalization.denormalize(final)
        return self.stages.decode(final)

    def sample(
        self,
        seeds: Sequence[int],
        conditions: Sequence[Any] | None = None,
        progress: Callable[[Any], Any] = lambda it: it,
        *,
        plan: SamplingPlan | None = None,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final samples for `seeds` with one condition (class, prompt or observation) per seed. `plan`: a loop
        on the same graphs other than plan.json's (a warm-started chunk's tail, core.warm_start), from `start`."""
        batch = self.encode(conditions, len(seeds))
        loop = self.plan.sampling if plan is None else plan
        return sample(loop, self.plan.sample_shape, self.loop, seeds, batch, progress=progress, start=start)
