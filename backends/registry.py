"""The backend interface and the registry that resolves `target.backend.name` to an implementation.

A backend module (one file, e.g. backends/ort.py) defines `BACKEND`: a callable taking the target's
backend options (a dict with at least "name") and returning an object with this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch

from core.discovery import module_members
from core.errors import ConfigError
from core.ir import DiffusionProgram, SamplingPlan
from core.sampling import DenoiseFn, Variants

from .plan import LoadedPlan, read_plan

# Not backends themselves: shared by the ONNX-based backends, or parts of one (trt_*).
SHARED = (
    "registry",
    "graph_memo",
    "lowering",
    "onnx_export",
    "pipeline_stages",
    "plan",
    "qdq",
    "runner",
    "trt_lint",
    "trt_engines",
    "trt_files",
)


class Runner(Protocol):
    """Executes a lowered artifact: the same loop as the reference program, on the backend's runtime."""

    plan: LoadedPlan
    loop: Variants  # the graph variants as loop callables (core.sampling.StepFn)
    denoise: DenoiseFn  # the graph of step 0 as a plain denoise function (latency of one call)

    def sample(
        self,
        seeds: Sequence[int],
        conditions: Sequence[Any] | None = None,
        progress: Callable[[Any], Any] = ...,
        *,
        plan: SamplingPlan | None = None,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def decode(self, final: torch.Tensor) -> torch.Tensor:
        """Final samples -> images in [-1, 1] (the decoder stage of a latent pipeline; else unchanged)."""
        ...

    def describe(self) -> dict[str, Any]: ...


class Backend(Protocol):
    name: str

    def lower(self, program: DiffusionProgram, folder: Path) -> dict[str, Any]:
        """Write the program's artifacts (graphs/engines + plan.json) into `folder`; what was written."""
        ...

    def runner(self, folder: Path) -> Runner: ...

    def describe(self) -> dict[str, Any]:
        """Name, runtime version, devices/providers: for the report."""
        ...

    def runtime_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions its runtime raises on a bad artifact (reported as bad input, exit 2)."""
        ...


@cache
def factories() -> dict[str, Callable[[Mapping[str, Any]], Backend]]:
    """Every backend module's `BACKEND`, by name."""
    return {factory.name: factory for factory in module_members("backends", "BACKEND", SHARED).values()}


def names() -> tuple[str, ...]:
    return tuple(sorted(factories()))


def get_backend(options: Mapping[str, Any]) -> Backend:
    """The backend a target's "backend" options name, configured with them."""
    name = options.get("name")
    if name not in factories():
        raise ConfigError(f"unknown backend {name!r} (known: {', '.join(names())})")
    return factories()[name](options)


def open_runner(folder: Path, options: Mapping[str, Any] | None = None) -> Runner:
    """A runner over an output folder, on the backend its plan.json names (`options` override it)."""
    return get_backend(options or read_plan(folder).backend).runner(folder)
