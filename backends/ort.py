"""The ONNX Runtime backend: ONNX graphs (fp32 or Q/DQ) run by ORT sessions on the target's providers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.ir import DiffusionProgram
from core.validate import integer, string_list

from .runner import LoopGraph, PlanRunner

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def runtime_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises when a session cannot be created or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented")
    return (*(getattr(state, n) for n in names if hasattr(state, n)), state.RuntimeException)


class OrtDenoiser(LoopGraph):
    """One graph in an ORT session (see LoopGraph). `condition_names` defaults to "class_labels" when
    the graph has that input."""

    def __init__(
        self,
        path: Path,
        providers: tuple[str, ...] = DEFAULT_PROVIDERS,
        threads: int = 0,
        condition_names: tuple[str, ...] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or list(DEFAULT_PROVIDERS)
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        inputs = [i.name for i in self.session.get_inputs()]
        if condition_names is None:
            condition_names = ("class_labels",) if "class_labels" in inputs else ()
        super().__init__(inputs, [o.name for o in self.session.get_outputs()], condition_names)

    def describe(self) -> dict[str, Any]:
        return {"providers": self.session.get_providers()}

    def session_fn(self):
        """The graph as a plain callable: {input name: array} -> [output arrays]."""
        return lambda feeds: self.session.run(None, feeds)

    def run(self, feeds: dict[str, torch.Tensor], outputs: list[str]) -> list[torch.Tensor]:
        values = self.session.run(outputs, {n: np.ascontiguousarray(v.numpy()) for n, v in feeds.items()})
        return [torch.from_numpy(v) for v in values]


class OrtBackend:
    """Options: "providers" (ORT execution providers, in order of preference; unavailable ones are
    skipped, CPU is the fallback) and "threads" (intra-op threads, 0: ORT's default)."""

    name = "onnxruntime"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.providers = tuple(string_list(options.get("providers", list(DEFAULT_PROVIDERS)), "backend.providers"))
        # More intra-op threads than cores only slows a run down (1500: 16x) or deadlocks under a pid limit.
        self.threads = integer(options.get("threads", 0), "backend.threads", 0, os.cpu_count() or 1)

    def options(self) -> dict[str, Any]:
        return {"name": self.name, "providers": list(self.providers)}

    def lower(self, program: DiffusionProgram, folder: Path) -> dict[str, Any]:
        from .lowering import lower_onnx

        return lower_onnx(program, folder, self.options())

    def runner(self, folder: Path, describe: dict[str, Any] | None = None) -> PlanRunner:
        """`describe`: what the runner reports as its backend (default: this backend's description)."""

        def open_graph(path: Path, condition_names: tuple[str, ...]) -> OrtDenoiser:
            return OrtDenoiser(path, self.providers, self.threads, condition_names)

        def open_stage(path: Path):
            return OrtDenoiser(path, self.providers, self.threads, ()).session_fn()

        return PlanRunner(folder, open_graph, describe or self.describe(), open_stage)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"name": self.name, "version": ort.__version__, "providers_requested": list(self.providers)}

    def runtime_errors(self) -> tuple[type[BaseException], ...]:
        return runtime_errors()


BACKEND = OrtBackend
