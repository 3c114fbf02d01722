"""What the TensorRT backend's files are called, and its runtime error: shared by the backend (which imports
TensorRT lazily) and the engine module (which needs it), so neither imports the other's module."""

from __future__ import annotations

from pathlib import Path

ENGINE_SUFFIX = ".plan"
TIMING_CACHE = "tensorrt.timing-cache"


class EngineError(RuntimeError):
    """TensorRT refused an input shape or failed to execute (reported as a bad artifact, exit 2)."""


def engine_path(graph: Path) -> Path:
    """The engine built from the graph file `graph`, beside it."""
    return graph.with_suffix(ENGINE_SUFFIX)
