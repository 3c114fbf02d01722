"""Lowered artifacts judged on a search's proxy seeds: the same judges and floor set a search trial gets, so an
artifact's shift there can be compared with the trials' (BENCHMARKS.md, "cpu-auto under the shift gates").

    python -m bench.seedset_gap MODEL ARTIFACT [ARTIFACT ...]   # 100 proxy seeds, --seed 0
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from backends.registry import get_backend
from core.loading import load_program
from search.proxy import ProxySet
from verify.judges import JudgeOptions, plan_judges

METRICS = ("fd_self_shift", "fd_digits_shift", "class_agreement_drop", "psnr_db_mean")


def judge_on_proxy_seeds(model: Path, artifacts: list[Path], samples: int = 100, seed: int = 0) -> dict[str, Any]:
    """Each artifact's ONNX Runtime loop on the proxy seeds of a search run with `--seed seed`, judged as a trial
    is (the original's VAE decodes latents)."""
    program = load_program(model)
    proxy = ProxySet(program, samples, seed, plan_judges(program, JudgeOptions()))
    backend, rows = get_backend({"name": "onnxruntime"}), {}
    for artifact in artifacts:
        runner = backend.runner(artifact)
        measured = proxy.verdict(runner.sample(proxy.seeds, proxy.conditions), [math.nan])
        rows[str(artifact)] = {k: measured.get(k) for k in METRICS}
    return rows


if __name__ == "__main__":
    for name, row in judge_on_proxy_seeds(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]).items():
        print(name, row)
