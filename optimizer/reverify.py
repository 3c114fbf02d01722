"""Lowered artifacts judged again as `optimize` verifies them now: the target's gates (from each artifact's
report.json), the evaluation seeds of --seed 0 and, for the distribution gates, disjoint seed sets drawn one at a
time while a gate lies within its seed noise of its bound (verify.seed_sets). For artifacts written before the
seed sets: the verdict each would get today, without optimizing again.

    python -m optimizer.reverify MODEL ARTIFACT [ARTIFACT ...] [--samples 100] [--seed-sets 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from backends.registry import get_backend
from optimizer.options import JobOptions
from optimizer.prepare import load_checked
from optimizer.targets import get_target
from optimizer.tasks import verify_lowered
from verify.gates import evaluate_gates, passed


def reverify(model: Path, artifact: Path, samples: int = 100, seed_sets: int = 4) -> dict[str, Any]:
    """The artifact's verification and gates as a job with its target would give them now."""
    report = json.loads((artifact / "report.json").read_text())
    opts = JobOptions(target=report["target"]["name"], samples=samples, seed_sets=seed_sets, latency_repeats=0)
    target = get_target(opts.target)
    loaded = load_checked(model, target, opts)
    runner = get_backend({"name": report["backend"]}).runner(artifact)  # the runtime that verified it
    summary, _, _ = verify_lowered(loaded.program, runner, opts, lambda it, **_: it, loaded.judges, loaded.gates)
    results = evaluate_gates(loaded.gates, summary)
    gates = {r.gate.name: {"bound": r.bound, "value": r.value, "status": r.status, "detail": r.reason} for r in results}
    return {"target": opts.target, "passed": passed(results), "gates": gates, "seed_sets": summary.get("seed_sets")}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m optimizer.reverify", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed-sets", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="write every artifact's result here")
    args = parser.parse_args()
    results = {}
    for artifact in args.artifacts:
        row = results[str(artifact)] = reverify(args.model, artifact, args.samples, args.seed_sets)
        print(f"{artifact} ({row['target']}, {row['seed_sets']} seed sets): {'PASS' if row['passed'] else 'FAIL'}")
        for name, gate in row["gates"].items():
            print(f"  {name} <= {gate['bound']:g}: {gate['value']} {gate['status']} ({gate['detail']})", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
