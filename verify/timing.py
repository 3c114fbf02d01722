"""Wall-clock timing for the report: medians of repeated calls, torch and ORT measured side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def paired_median_ms(
    fns: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3, rounds: int = 4
) -> dict[str, float]:
    """Medians of calls taken in alternating blocks (A A A, B B B, then B B B, A A A, ...: the order flips
    every round), so that slow drifts of the machine and whatever the first block of a round pays hit every
    contender alike. Each block starts with an untimed call: runtimes that spin their thread pools (ONNX
    Runtime) must not be timed while another one's threads are still spinning."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_block = max(1, -(-repeats // rounds))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for key, fn in list(fns.items())[:: -1 if r % 2 else 1]:
            fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}
