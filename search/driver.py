"""The search from a job's point of view: trials (this process and its workers), then finalists at full
budget, verified in order until one passes the gates, then the chosen recipe's attribution.

The job owns lowering, verification and the output folder; it hands `verify` in (candidate -> whether
the gates pass, plus whatever it wants back)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from core.ir import DiffusionProgram
from passes.manager import plan_passes
from search import attribution, pareto
from search.space import SearchSpace
from search.study import METRICS, evaluated, requeue_stale, run_trials
from search.trials import TrialRunner


@dataclass
class Outcome:
    candidate: DiffusionProgram
    verified: Any  # what `verify` returned for the chosen candidate
    passed: bool
    record: dict[str, Any] = field(default_factory=dict)  # report.json's "search"
    sections: list[str] = field(default_factory=list)  # report.md


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    return [
        {"number": t.number, "params": t.params, "metrics": t.user_attrs[METRICS], "worker": t.user_attrs.get("worker")}
        for t in evaluated(study)
    ]


def finalists(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The fastest candidates that met the gates on the proxies, best first (by measured speedup)."""
    feasible = [r for r in rows if r["metrics"]["feasible"]]
    return sorted(feasible, key=lambda r: -r["metrics"]["speedup"])[:count]


def search(
    runner: TrialRunner,
    study: optuna.Study,
    verify: Callable[[DiffusionProgram], tuple[bool, Any]],
    log: Callable[[str], None],
    wait_for_workers: Callable[[], None] = lambda: None,
) -> Outcome:
    space: SearchSpace = runner.space
    start = time.perf_counter()
    requeue_stale(study, log)
    kept = len(evaluated(study))
    if kept:
        log(f"resuming: {kept} evaluated trial(s) kept, not redone")
    run_trials(study, space, runner.evaluate, log)
    wait_for_workers()
    trials_s = time.perf_counter() - start
    rows = trial_rows(study)
    chosen_rows = finalists(rows, space.finalists)
    if not chosen_rows:  # nothing met the gates on the proxies: verify the closest to meeting them
        chosen_rows = sorted(rows, key=lambda r: sum(max(0.0, c) for c in r["metrics"]["constraints"].values()))[:1]
        log("no candidate met the gates on the proxy seeds: verifying the one closest to them")
    tried, outcome = [], None
    for k, row in enumerate(chosen_rows):
        log(
            f"finalist {k + 1}/{len(chosen_rows)}: trial {row['number']} ({space.describe(row['params'])}), full budget"
        )
        candidate = runner.candidate(row["params"], full=True)
        passed, verified = verify(candidate)
        tried.append({"trial": row["number"], "params": row["params"], "passed": passed})
        outcome = Outcome(candidate, verified, passed)
        if passed:
            break
        log(f"finalist {k + 1}: a gate failed on the full verification")
    assert outcome is not None
    chosen_number = tried[-1]["trial"]
    chosen_index = next(i for i, r in enumerate(rows) if r["number"] == chosen_number)
    params = rows[chosen_index]["params"]
    recipe = runner.recipe(params, full=True)
    log("attribution: the chosen recipe's prefixes, timed side by side")
    shares = attribution.attribute(runner, plan_passes(recipe, runner.ctx.capabilities, program=runner.program))
    workers = sorted({r["worker"] for r in rows if r["worker"]})
    outcome.record = {
        "space": {
            "knobs": {k.name: list(k.choices) for k in space.knobs},
            "size": space.size,
            "trials": space.trials,
            "finalists": space.finalists,
            "proxy_budget": space.proxy_budget,
            "proxy_samples": space.proxy_samples,
        },
        "study": study.study_name,
        "workers": workers,
        "trials": rows,
        "kept_from_earlier_runs": kept,
        "finalists": tried,
        "chosen": {"trial": chosen_number, "params": params, "recipe": recipe},
        "attribution": shares,
        "pareto_front": [rows[i]["number"] for i in pareto.front(rows)],
        "seconds": {"trials": round(trials_s, 1), "total": round(time.perf_counter() - start, 1)},
    }
    outcome.sections = _markdown(outcome.record, space, chosen_index)
    return outcome


def _markdown(record: dict[str, Any], space: SearchSpace, chosen: int) -> list[str]:
    rows, knobs = record["trials"], [k.name for k in space.knobs]
    secs = record["seconds"]
    lines = [
        "",
        "## Search",
        f"- space: {' x '.join(f'{k} ({len(v)})' for k, v in record['space']['knobs'].items())} = "
        f"{record['space']['size']} recipes; {len(rows)} evaluated by TPE (Optuna) with the gates as constraints"
        f" and measured speed as the objective, {len(record['workers'])} worker process(es)",
        (
            f"- trials run each recipe with its training budgets x {space.proxy_budget}"
            if space.proxy_budget < 1
            else "- trials run each recipe at its full training budget"
        )
        + f", judged against the gates on {space.proxy_samples} proxy seeds of their own; the fastest that met them"
        " were verified on the evaluation seeds in order (finalists below)",
        f"- time: trials {secs['trials']:.0f} s, with finalists and attribution {secs['total']:.0f} s"
        + (
            f"; {record['kept_from_earlier_runs']} trial(s) kept from an interrupted run"
            if record["kept_from_earlier_runs"]
            else ""
        ),
        f"- chosen: trial {record['chosen']['trial']}: {space.describe(record['chosen']['params'])}",
        f"- chosen recipe: `{' + '.join(s['pass'] for s in record['chosen']['recipe']) or 'no passes'}`",
        "",
        "### Candidates",
        "",
        "Speedup: the candidate's whole loop for one sample (a policy's: its time per decision over an episode) vs"
        " the original's fp32 graph, same backend, side by side.",
        "",
        *pareto.table(rows, knobs, chosen),
        "",
        f"![Pareto front]({pareto.PLOT_FILE})",
        "",
        "### Finalists",
        "",
        "| trial | recipe | full verification |",
        "|---|---|---|",
        *(
            f"| {f['trial']} | {space.describe(f['params'])} | {'pass' if f['passed'] else 'FAIL'} |"
            for f in record["finalists"]
        ),
        "",
        "### Each pass's share",
        "",
        *attribution.markdown(record["attribution"]),
    ]
    return lines
