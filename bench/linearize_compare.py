"""Side by side on one model and one evaluation set (`optimize linearize-compare`): attention linearization
as the pass does it (blocks by sensitivity, replaced layers distilled) vs the naive variants (no
distillation; every block replaced), each mechanism, lowered and timed in ONNX Runtime with the original's
fp32 graph (the rows and measurements of bench.prune_compare: structural recipes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.prune_compare import compare_pruning, markdown_table
from core.adapters import adapter_for, adapters
from core.errors import ConfigError
from core.ir import DiffusionProgram

LINEAR = {"kind": "linear", "feature_map": "relu", "conv": True}
LOCAL = {"kind": "local", "radius": 2.0, "tile": 2}  # 36 keys per query of the DiT's 64 tokens


def _row(name: str, **config: Any) -> tuple[str, list[dict[str, Any]]]:
    return name, [{"pass": "linearize", "config": config}]


ROWS = [  # the first row is cpu-linearize's recipe (tests/bench/test_linearize_compare.py)
    _row(
        "linear + conv, up to 3/4 of the blocks by sensitivity, distilled, most sensitive given softmax back"
        " until 34 dB on the calibration seeds (ours, cpu-linearize)",
        **LINEAR,
        fraction=0.75,
        steps=300,
        min_calibration_psnr_db=34.0,
    ),
    _row("linear + conv, half the blocks by sensitivity, distilled (a fixed count)", **LINEAR, fraction=0.5),
    _row("linear + conv, the same blocks, not distilled (naive)", **LINEAR, fraction=0.5, steps=0),
    _row("linear + conv, every block, distilled", **LINEAR, selection="all"),
    _row("linear + conv, every block, not distilled (naive)", **LINEAR, selection="all", steps=0),
    _row("linear (no conv), half the blocks by sensitivity, distilled", **{**LINEAR, "conv": False}, fraction=0.5),
    _row("local r=2, half the blocks by sensitivity, distilled", **LOCAL, fraction=0.5),
    _row("local r=2, the same blocks, not distilled (naive)", **LOCAL, fraction=0.5, steps=0),
]


def compare_linearization(
    program: DiffusionProgram, samples: int, calibration_samples: int, progress: Callable, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    if adapter_for(program.spec.model_class).block_stack is None:
        stacks = ", ".join(sorted(a.family for a in adapters().values() if a.block_stack is not None))
        raise ConfigError(f"linearize-compare: transformer families only ({stacks}), not {program.spec.family}")
    return compare_pruning(program, samples, calibration_samples, progress, log, rows=ROWS, desc="linearize rows")


__all__ = ["compare_linearization", "markdown_table"]
