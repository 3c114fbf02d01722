"""Lowered artifacts judged on a search's proxy seeds: the same judges and floor set a search trial gets, so an
artifact's shift there can be compared with the trials' (BENCHMARKS.md, "cpu-auto under the shift gates").
With --sets K, each artifact is judged on K disjoint proxy seed sets (each with its own reference and floor
set): how far the shift of one artifact moves from one 100-seed set to another.

    python -m bench.seedset_gap MODEL ARTIFACT [ARTIFACT ...]             # 100 proxy seeds, --seed 0
    python -m bench.seedset_gap MODEL ARTIFACT --sets 6 [--samples 100]   # the spread over 6 disjoint sets
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from backends.registry import get_backend
from core.ir import DiffusionProgram
from core.loading import load_program
from search.proxy import ProxySet
from verify.judges import JudgeOptions, plan_judges

METRICS = ("fd_self_shift", "fd_digits_shift", "class_agreement_drop", "psnr_db_mean")
SPREAD = ("fd_self_shift", "fd_digits_shift")  # the gated distribution metrics whose spread is shown


def judge_on_proxy_seeds(
    model: Path, artifacts: list[Path], samples: int = 100, seed: int = 0, keys: tuple[str, ...] = METRICS
) -> dict[str, Any]:
    """Each artifact's ONNX Runtime loop on the proxy seeds of a search run with `--seed seed`, judged as a trial
    is (the original's VAE decodes latents)."""
    return _judge_on_seed_sets(load_program(model), artifacts, samples, [seed], keys)[0]


def spread(model: Path, artifacts: list[Path], sets: int, samples: int = 100) -> dict[str, Any]:
    """Per artifact and gated metric: the value on each of `sets` disjoint proxy seed sets (set k: the proxy
    seeds of --seed k * samples), their mean and standard deviation."""
    seeds = [k * samples for k in range(sets)]
    per_set = _judge_on_seed_sets(load_program(model), artifacts, samples, seeds, SPREAD)
    result: dict[str, Any] = {}
    for artifact in map(str, artifacts):
        rows = [s[artifact] for s in per_set]
        result[artifact] = {}
        for metric in SPREAD:
            values = [r[metric] for r in rows if r[metric] is not None]
            if not values:
                continue
            result[artifact][metric] = {
                "per_set": values,
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else math.nan,
            }
    return result


def _judge_on_seed_sets(
    program: DiffusionProgram, artifacts: list[Path], samples: int, seeds: list[int], keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Per proxy seed set (a search's `--seed` each), each artifact's `keys` as a trial is judged there; the
    judges and the artifacts' runners are set up once."""
    judges = plan_judges(program, JudgeOptions())
    backend = get_backend({"name": "onnxruntime"})
    runners = {str(a): backend.runner(a) for a in artifacts}
    per_set = []
    for seed in seeds:
        proxy = ProxySet(program, samples, seed, judges)
        rows = {}
        for name, runner in runners.items():
            measured = proxy.verdict(runner.sample(proxy.seeds, proxy.conditions), [math.nan])
            rows[name] = {k: measured.get(k) for k in keys}
        per_set.append(rows)
    return per_set


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seedset_gap", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--sets", type=int, default=0, help="disjoint proxy seed sets (0: one set, --seed 0)")
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    if args.sets:
        for name, metrics in spread(args.model, args.artifacts, args.sets, args.samples).items():
            for metric, row in metrics.items():
                values = ", ".join(f"{v:.4f}" for v in row["per_set"])
                print(f"{name} {metric}: {values}; mean {row['mean']:.4f}, sd {row['sd']:.4f}")
        return
    for name, row in judge_on_proxy_seeds(args.model, args.artifacts, args.samples).items():
        print(name, row)


if __name__ == "__main__":
    main()
