"""A policy's success under other loops, closed loop in torch on the judge's episodes with the judge's noise
seeds (verify.judges.closed_loop): which sampler, step count and warm start a network keeps its task at, and,
after a recipe (a distilled student), at which of its own step counts. The loops are data, one spec each:

- `SCHEDULER[,key=value...]:STEPS[:WARM]`: the network's plan swapped to SCHEDULER (an alias: ddpm, ddim,
  dpmsolver++, euler; or a diffusers class) as diffusers users swap it, the config keys overridden, at STEPS
  steps, warm-started from timestep WARM (core.warm_start) when given;
- `consistency:STEPS[:WARM]`: a consistency student's own loop (diffusers' LCMScheduler on its grid,
  core.distill.consistency_plan) at STEPS steps;
- `plan[::WARM]`: the program's plan as it is."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from core import warm_start
from core.distill import consistency_plan
from core.environments import programs, rollout
from core.errors import ConfigError
from core.ir import DiffusionProgram, SamplingPlan
from core.sampling import network_evaluations
from core.schedulers import build_scheduler, with_scheduler
from verify.judges.closed_loop import EPISODE_SEED, NOISE_SEED


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string (e.g. trailing)


def loop_plan(program: DiffusionProgram, spec: str) -> SamplingPlan:
    """The plan a loop spec names (module docstring), built and checked (a ConfigError names the spec)."""
    head, *rest = spec.split(":")
    if len(rest) > 2 or (head != "plan" and not rest):
        raise ConfigError(f"loop '{spec}': expected SCHEDULER[,key=value...]:STEPS[:WARM]")
    try:
        steps = int(rest[0]) if rest and rest[0] else None
        warm = float(rest[1]) if len(rest) > 1 else None
    except ValueError:
        raise ConfigError(f"loop '{spec}': STEPS must be an integer and WARM a number") from None
    name, *pairs = head.split(",")
    plan = program.plan
    if name == "consistency":
        teacher = plan.scheduler_config.get("original_inference_steps")
        if plan.scheduler_class != "LCMScheduler" or teacher is None:
            raise ConfigError(f"loop '{spec}': the program is not a consistency student (run its recipe first)")
        plan = consistency_plan(plan, int(teacher), steps or plan.num_inference_steps)
    elif name != "plan":
        plan = with_scheduler(plan, name)
        overrides = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ConfigError(f"loop '{spec}': '{pair}' is not key=value")
            overrides[key] = _value(value)
        config = {**plan.scheduler_config, **overrides}
        plan = dataclasses.replace(plan, scheduler_config=config, num_inference_steps=steps or 0, timesteps=None)
    build_scheduler(plan)
    if warm is not None or name != "plan":  # `plan` alone keeps the program's own warm start
        plan = dataclasses.replace(plan, warm_start=warm)
    if plan.warm_start is not None:
        warm_start.tail(plan)  # a warm start the loop cannot take, refused before any episode
    return plan


def judge_loops(
    program: DiffusionProgram,
    env_name: str,
    specs: Sequence[str],
    episodes: int,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Per loop spec: success rate with its 95% interval, mean best coverage and evaluations per decision (the
    first decision's; a warm-started loop's later ones run its tail) over `episodes` of the judge's episodes."""
    chunking = program.spec.chunking
    if chunking is None:
        raise ConfigError("policy-loops: the model is not a policy")
    plans = [loop_plan(program, spec) for spec in specs]  # every spec checked before any runs
    seeds = list(range(EPISODE_SEED, EPISODE_SEED + episodes))
    rows = []
    for spec, plan in zip(specs, plans, strict=True):
        start = time.perf_counter()
        candidate = program.replace(plan=plan)
        done = rollout.run(env_name, programs.torch_policy(candidate, NOISE_SEED), seeds, chunking, desc=spec)
        low, high = done.interval()
        first = network_evaluations(dataclasses.replace(plan, warm_start=None), program.spec.conditioning)
        row = {
            "loop": spec,
            "timesteps": [float(t) for t in build_scheduler(dataclasses.replace(plan, warm_start=None)).timesteps],
            "evaluations_first_decision": first,
            "success_rate": done.success_rate,
            "interval": [round(low, 3), round(high, 3)],
            "mean_max_coverage": round(float(done.max_coverage.mean()), 3),
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        log(
            f"{spec}: success {row['success_rate']:.0%} ({low:.0%}-{high:.0%}), coverage"
            f" {row['mean_max_coverage']:.3f}, {first} evaluations at the first decision ({row['seconds']:.0f} s)"
        )
    return rows
