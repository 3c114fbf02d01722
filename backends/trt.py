"""The TensorRT backend: the same (Q/DQ) ONNX graphs as ONNX Runtime, linted for TensorRT, then one engine
per graph, built as NVIDIA's demo/Diffusion does: strongly typed networks (precision comes from the ONNX
types and Q/DQ nodes: INT8, FP8, INT4 weights), an optimization profile over the batch, a timing cache.

TensorRT is imported lazily. Without it or without a CUDA GPU, lowering still writes and lints the graphs,
records why no engine was built, and the runner executes the same graphs in ONNX Runtime on the CPU: the
report says which runtime produced every number.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from core.ir import DiffusionProgram
from core.validate import integer

from .ort import OrtBackend
from .plan import read_plan, record_files
from .runner import PlanRunner
from .trt_files import TIMING_CACHE, EngineError, engine_path
from .trt_lint import lint_file

MAX_ENGINE_BATCH = 1024  # the profile's largest batch (export-triton's max_batch bound)


def unavailable() -> str | None:
    """Why engines cannot be built or run here, or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install tensorrt, on a machine with CUDA)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


class TensorrtBackend:
    """Options: "max_batch" (the profile's largest batch; default 16), "fallback_providers" (ORT providers
    for the fallback; default CPU)."""

    name = "tensorrt"

    def __init__(self, options: Mapping[str, Any]) -> None:
        # At least 2: a guided step evaluates a batch of 2.
        self.max_batch = integer(options.get("max_batch", 16), "tensorrt: max_batch", 2, MAX_ENGINE_BATCH)
        self.fallback_providers = list(options.get("fallback_providers", ["CPUExecutionProvider"]))
        self.fallback = OrtBackend({"providers": self.fallback_providers})

    def options(self) -> dict[str, Any]:
        return {"name": self.name, "max_batch": self.max_batch, "fallback_providers": self.fallback_providers}

    def lower(self, program: DiffusionProgram, folder: Path) -> dict[str, Any]:
        from .lowering import lower_onnx

        written = lower_onnx(program, folder, self.options())
        graphs = [*written["onnx"], *written["stages"]]
        lint = {name: lint_file(folder / name) for name in graphs}
        reason = unavailable()
        if reason is None and not any(r["errors"] for r in lint.values()):
            from .trt_engines import build_engine

            cache = folder / TIMING_CACHE
            built = [build_engine(folder / g, engine_path(folder / g), cache, self.max_batch) for g in written["onnx"]]
            record_files(folder, [p.name for p in built])
            status: dict[str, Any] = {"built": [p.name for p in built]}
        else:
            status = {"built": [], "reason": reason or "the TensorRT lint found errors (see the lint)"}
        return {**written, "tensorrt": {"lint": lint, "engines": status}}

    def runner(self, folder: Path) -> PlanRunner:
        plan = read_plan(Path(folder), files=False)  # the runner below checks the graph files (sha256) once
        engines = [engine_path(plan.graph_path(name)) for name in plan.document["graphs"]]
        reason = unavailable() or (None if all(p.is_file() for p in engines) else "no engines were built")
        if reason is None:
            from .trt_engines import open_engine_runner

            return open_engine_runner(folder, self.describe())
        executed_by = f"onnxruntime {self.fallback.describe()['version']}"
        return self.fallback.runner(folder, {**self.describe(), "executed_by": executed_by, "why_not_tensorrt": reason})

    def describe(self) -> dict[str, Any]:
        try:
            import tensorrt

            version = tensorrt.__version__
        except ImportError:
            version = None
        return {"name": self.name, "version": version, "max_batch": self.max_batch}

    def runtime_errors(self) -> tuple[type[BaseException], ...]:
        return (*self.fallback.runtime_errors(), EngineError)


BACKEND = TensorrtBackend
