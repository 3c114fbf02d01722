"""A policy's time per control decision at batch 1 (observation in, action chunk out: normalization, the
whole sampling loop, un-normalization), the original as LeRobot users run it (its own plan in torch fp32:
DDPM at 100 steps by default; and the same network with DDIM at 10 steps) beside the optimized artifact on its
backend, timed interleaved in one run (verify.timing.paired_median_ms). The control rate a chunk allows when
it must be ready within one control period is 1000 / ms."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from core.environments import environment
from core.environments.programs import as_policy, torch_policy
from core.ir import DiffusionProgram
from core.sampling import network_evaluations
from core.schedulers import with_scheduler
from verify.timing import paired_median_ms

DDIM_STEPS = 10


def observation(program: DiffusionProgram, env_name: str) -> dict[str, np.ndarray]:
    """One decision's observations ([1, n_obs_steps, dim]): an episode's first, as its queue holds it."""
    env = environment(env_name)
    batch = env.Batch([0])
    try:
        first = batch.observations()
    finally:
        batch.close()
    chunking = program.spec.chunking
    assert chunking is not None
    return {k: np.repeat(v[:, None], chunking.n_obs_steps, axis=1) for k, v in first.items()}


def measure(program: DiffusionProgram, runner: Any, env_name: str, repeats: int) -> dict[str, Any]:
    """Median ms per decision of the original (its plan), the original with DDIM 10 and the artifact."""
    chunking = program.spec.chunking
    assert chunking is not None
    ddim = program.replace(
        plan=dataclasses.replace(with_scheduler(program.plan, "ddim"), num_inference_steps=DDIM_STEPS)
    )
    obs = observation(program, env_name)
    contenders = {
        "original": (torch_policy(program), program.plan),
        f"original, DDIM {DDIM_STEPS}": (torch_policy(ddim), ddim.plan),
        "artifact": (as_policy(runner.sample, runner.decode, 0), runner.plan.sampling),
    }
    calls = {k: functools.partial(policy, 0, np.zeros(1, int), obs) for k, (policy, _) in contenders.items()}
    medians = paired_median_ms(calls, repeats, warmup=1)
    rows = {}
    for name, (_, plan) in contenders.items():
        ms = medians[name]
        rows[name] = {
            "scheduler": plan.scheduler_class,
            "network_evaluations": network_evaluations(plan, program.spec.conditioning),
            "ms_per_decision": ms,
            "decisions_per_second": 1000.0 / ms,
        }
    artifact = medians["artifact"]
    for name in rows:
        rows[name]["speedup_of_artifact"] = medians[name] / artifact
    return {"repeats": repeats, "batch": 1, "n_action_steps": chunking.n_action_steps, "rows": rows}


def lines(result: dict[str, Any]) -> list[str]:
    out = [f"{'':28} {'scheduler':16} {'evals':>5} {'ms/decision':>12} {'Hz':>8} {'artifact speedup':>17}"]
    for name, row in result["rows"].items():
        out.append(
            f"{name:28} {row['scheduler']:16} {row['network_evaluations']:>5} {row['ms_per_decision']:>12.2f}"
            f" {row['decisions_per_second']:>8.1f} {row['speedup_of_artifact']:>16.1f}x"
        )
    return out
