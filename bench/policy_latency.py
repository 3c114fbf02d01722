"""A policy's time per control decision at batch 1 (observation in, action chunk out: normalization, the
whole sampling loop, un-normalization), the original as LeRobot users run it (its own plan in torch fp32:
DDPM at 100 steps by default; and the same network with DDIM at 10 steps) beside the optimized artifact on its
backend, timed interleaved in one run (verify.timing.paired_median_ms). The originals run diffusers' own
scheduler steps, as LeRobot's `select_action` does; the artifact runs ours (core.ddpm_step: DDPM's step with
its scalars computed once per plan, equal to diffusers' bit for bit). The control rate a chunk allows when
it must be ready within one control period is 1000 / ms."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from core import warm_start
from core.ddpm_step import diffusers_steps
from core.environments import decisions_per_episode, environment
from core.environments.programs import as_policy, torch_policy
from core.ir import DiffusionProgram
from core.sampling import network_evaluations
from core.schedulers import with_scheduler
from verify.timing import paired_median_ms

DDIM_STEPS = 10
WARM = "artifact, warm decision"
EPISODE_MEAN = "artifact, episode mean"


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
    """Median ms per decision of the original (its plan), the original with DDIM 10 and the artifact. An
    artifact with warm-started chunks (core.warm_start) is timed at an episode's first decision (its whole
    loop) and at a later one (the loop's tail, from the previous chunk), and `episode_mean` weighs the two over
    an episode of the environment's step limit."""
    chunking = program.spec.chunking
    assert chunking is not None
    ddim = program.replace(
        plan=dataclasses.replace(with_scheduler(program.plan, "ddim"), num_inference_steps=DDIM_STEPS)
    )
    obs = observation(program, env_name)
    plan = runner.plan.sampling
    artifact = functools.partial(as_policy, runner.sample, runner.decode, 0, plan, chunking)
    contenders: dict[str, tuple[Any, Any, int]] = {  # name: (policy, the loop it runs, decision index)
        "original": (torch_policy(program), program.plan, 0),
        f"original, DDIM {DDIM_STEPS}": (torch_policy(ddim), ddim.plan, 0),
        "artifact": (artifact(), plan, 0),
    }
    if plan.warm_start is not None:
        warm = artifact()
        warm(0, np.zeros(1, int), obs)  # the episode's first chunk, which the next decision starts from
        contenders[WARM] = (warm, warm_start.tail(plan), 1)
    calls = {k: functools.partial(p, d, np.zeros(1, int), obs) for k, (p, _, d) in contenders.items()}
    for name in ("original", f"original, DDIM {DDIM_STEPS}"):  # as LeRobot runs them: diffusers' own steps
        calls[name] = functools.partial(_with_diffusers_steps, calls[name])
    medians = paired_median_ms(calls, repeats, warmup=1)
    decisions = decisions_per_episode(env_name, chunking.n_action_steps)
    rows: dict[str, dict[str, Any]] = {}
    for name, (_, loop, _) in contenders.items():
        rows[name] = {
            "scheduler": loop.scheduler_class,
            "network_evaluations": network_evaluations(loop, program.spec.conditioning),
            "ms_per_decision": medians[name],
        }
    if WARM in rows:  # the first decision cold, the rest warm
        evaluations = (rows["artifact"]["network_evaluations"], rows[WARM]["network_evaluations"])
        rows[EPISODE_MEAN] = {
            "scheduler": plan.scheduler_class,
            "network_evaluations": warm_start.episode_mean(*evaluations, decisions),
            "ms_per_decision": warm_start.episode_mean(medians["artifact"], medians[WARM], decisions),
        }
    artifact_is = EPISODE_MEAN if WARM in rows else "artifact"  # the row the speedups are against
    for row in rows.values():
        row["decisions_per_second"] = 1000.0 / row["ms_per_decision"]
        row["speedup_of_artifact"] = row["ms_per_decision"] / rows[artifact_is]["ms_per_decision"]
    return {
        "repeats": repeats,
        "batch": 1,
        "n_action_steps": chunking.n_action_steps,
        "decisions_per_episode": decisions,
        "artifact_is": artifact_is,
        "rows": rows,
    }


def _with_diffusers_steps(call: Any) -> Any:
    with diffusers_steps():
        return call()


def lines(result: dict[str, Any]) -> list[str]:
    out = [f"{'':28} {'scheduler':16} {'evals':>5} {'ms/decision':>12} {'Hz':>8} {'artifact speedup':>17}"]
    for name, row in result["rows"].items():
        out.append(
            f"{name:28} {row['scheduler']:16} {row['network_evaluations']:>5.3g} {row['ms_per_decision']:>12.2f}"
            f" {row['decisions_per_second']:>8.1f} {row['speedup_of_artifact']:>16.1f}x"
        )
    if result["artifact_is"] == EPISODE_MEAN:
        n = result["decisions_per_episode"]
        out.append(
            f"(speedups against the artifact's episode mean: its first decision whole, the other {n - 1} of a"
            f" {n}-decision episode warm-started)"
        )
    return out
