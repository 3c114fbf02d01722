"""diffusers schedulers as a plan runs them: built from the plan's class and config (every field bounded), set to
its steps or a custom timestep grid, swapped the way diffusers users swap them (`X.from_config`), the plan's
model calls counted and checked."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError, one_line
from core.ir import SamplingPlan
from core.validate import is_int

SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
}


# Solvers that run on any timestep grid (core.schedulers.custom_timesteps): a searched schedule or a
# distilled student's (DDIM through core.grid_ddim, which diffusers' DDIMScheduler lacks).
GRID_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("GridDDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
}
FLOW_GRID_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 1.0, "use_dynamic_shifting": False}),
}


def on_grid(plan: SamplingPlan, solver: str, timesteps: Sequence[float]) -> SamplingPlan:
    """The plan run by `solver` (GRID_SOLVERS, or FLOW_GRID_SOLVERS for a flow-matching plan) on a
    timestep grid, keeping the trained noise schedule, guidance and prediction type."""
    table = FLOW_GRID_SOLVERS if is_flow(plan) else GRID_SOLVERS
    if solver not in table:
        raise ConfigError(f"solver '{solver}' does not run on a custom grid here (known: {', '.join(table)})")
    class_name, overrides = table[solver]
    swapped = with_scheduler(plan, class_name)
    config = {**swapped.scheduler_config, **overrides}
    before, after = full_config(plan), full_config(swapped)
    if before.get("clip_sample") and "thresholding" in after and "clip_sample" not in after:
        # DDIM's x0 clipping is dynamic thresholding with its bound fixed at the clip range.
        config.update(thresholding=True, sample_max_value=float(before.get("clip_sample_range", 1.0)))
    return dataclasses.replace(
        swapped,
        scheduler_config=config,
        num_inference_steps=len(timesteps),
        timesteps=tuple(float(t) for t in timesteps),
        mu=None,
        linear_sigmas=False,
    )


def scheduler_class(name: str) -> type:
    """A concrete diffusers scheduler class by name (not a mixin or base class)."""
    import diffusers

    from core.grid_ddim import GridDDIMScheduler

    local = {"GridDDIMScheduler": GridDDIMScheduler}
    cls = local.get(name) or (getattr(diffusers, name, None) if name.isidentifier() else None)
    concrete = (
        isinstance(cls, type)
        and issubclass(cls, diffusers.SchedulerMixin)
        and issubclass(cls, diffusers.ConfigMixin)
        and cls is not diffusers.SchedulerMixin
        and callable(getattr(cls, "step", None))
    )
    if not concrete and cls is not None and hasattr(cls, "_backends"):  # diffusers' placeholder for a missing extra
        missing = [b for b in cls._backends if b != "torch"]
        raise ConfigError(f"scheduler '{name}' needs {' and '.join(missing)}, which is not installed here")
    if not concrete:
        known = ", ".join(SCHEDULER_ALIASES)
        raise ConfigError(f"unknown scheduler '{name}' (aliases: {known}, or a diffusers scheduler class)")
    assert cls is not None  # concrete
    return cls


# Solver orders diffusers' multistep schedulers support (DPM-Solver, UniPC, DEIS: 1-3; SA-Solver's predictor and
# corrector: 1-4). Each keeps that many past outputs; an order of 1e9 allocated until the OOM killer came.
ORDER_KEYS = ("solver_order", "predictor_order", "corrector_order")
MAX_ORDER = 4


def _check_scheduler_config(config: dict[str, Any]) -> None:
    """Sizes a scheduler allocates at construction or per step: bounded before diffusers sees them."""
    from core.limits import MAX_TRAIN_TIMESTEPS

    n = config.get("num_train_timesteps", 1000)
    if not is_int(n) or not 1 <= n <= MAX_TRAIN_TIMESTEPS:
        raise ConfigError(
            f"scheduler num_train_timesteps must be an integer in [1, {MAX_TRAIN_TIMESTEPS:,}], got {n!r}"
        )
    betas = config.get("trained_betas")
    if betas is not None and (not isinstance(betas, list) or len(betas) > MAX_TRAIN_TIMESTEPS):
        raise ConfigError("scheduler trained_betas must be a list of at most one entry per train timestep")
    for key in ORDER_KEYS:
        order = config.get(key)
        if order is not None and (not is_int(order) or not 1 <= order <= MAX_ORDER):
            raise ConfigError(f"scheduler {key} must be an integer in [1, {MAX_ORDER}], got {order!r}")
    offset = config.get("steps_offset", 0)
    if not is_int(offset) or not 0 <= offset < n:
        raise ConfigError(f"scheduler steps_offset must be an integer in [0, {n}), got {offset!r}")


def _from_config(cls: Any, config: dict[str, Any]) -> Any:
    _check_scheduler_config(config)
    try:
        return cls.from_config(config)
    except Exception as exc:  # diffusers raises many types for a bad config
        raise ConfigError(f"{cls.__name__} cannot be built from this scheduler config ({one_line(exc, 300)})") from None


def full_config(plan: SamplingPlan) -> dict[str, Any]:
    """The plan's scheduler config with the class defaults filled in (as its pipeline reads it)."""
    return dict(_from_config(scheduler_class(plan.scheduler_class), plan.scheduler_config).config)


def build_scheduler(plan: SamplingPlan) -> Any:
    try:
        key = json.dumps(plan.scheduler_config, sort_keys=True)
    except (TypeError, ValueError):  # a config that is not plain JSON: built each time
        scheduler = _from_config(scheduler_class(plan.scheduler_class), plan.scheduler_config)
    else:
        scheduler = copy.deepcopy(_constructed(plan.scheduler_class, key))
    train = scheduler.config.num_train_timesteps
    if not 1 <= plan.num_inference_steps <= train:
        raise ConfigError(
            f"{plan.num_inference_steps} sampling steps: must be in [1, {train}] (the scheduler's train timesteps)"
        )
    try:
        set_timesteps(scheduler, plan)
    except Exception as exc:
        raise ConfigError(
            f"{plan.scheduler_class} cannot plan {plan.num_inference_steps} steps ({one_line(exc, 300)})"
        ) from None
    return scheduler


@functools.lru_cache(maxsize=64)
def _constructed(class_name: str, config_json: str) -> Any:
    """A scheduler built once per (class, config): construction recomputes the noise schedule in Python
    (milliseconds per image, e.g. the cosine betas), so loops take a fresh copy of this one, as a
    diffusers pipeline keeps its scheduler across calls."""
    return _from_config(scheduler_class(class_name), json.loads(config_json))


def set_timesteps(scheduler: Any, plan: SamplingPlan) -> None:
    """The plan's timesteps, passing a flow-matching plan's `mu` and linear sigmas as its pipeline does."""

    if plan.timesteps is not None:
        custom_timesteps(scheduler, plan.timesteps)
        return
    n, kwargs = plan.num_inference_steps, {}
    if is_flow(plan) and plan.mu is not None:
        kwargs["mu"] = plan.mu
    if is_flow(plan) and plan.linear_sigmas and not scheduler.config.get("use_flow_sigmas"):
        kwargs["sigmas"] = np.linspace(1.0, 1 / n, n)
    scheduler.set_timesteps(n, **kwargs)


def custom_timesteps(scheduler: Any, timesteps: Sequence[float]) -> None:
    """Plan the scheduler on given timesteps (descending, train-timestep units).

    Schedulers whose `set_timesteps` takes `timesteps` get them directly; flow matching takes them as
    sigmas (t / num_train_timesteps, no shift: the grid is already final); the multistep solvers that
    take neither (UniPC, DEIS) are planned for as many steps and given the grid's sigmas, which is all
    their update reads (diffusers' own `sigmas`/`timesteps` pair; the last sigma, the end point, kept)."""

    params = inspect.signature(scheduler.set_timesteps).parameters
    ts = np.asarray(timesteps, dtype=np.float64)
    train = scheduler.config.num_train_timesteps
    if scheduler.__class__.__name__.startswith("FlowMatch") or scheduler.config.get("use_flow_sigmas"):
        scheduler.set_timesteps(sigmas=ts / train)
        return
    if "timesteps" in params:
        from diffusers.utils import logging

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # a custom grid is meant: LCM's warning that it starts below T - 1 is noise
        try:
            scheduler.set_timesteps(timesteps=[round(t) for t in ts])
        finally:
            logging.set_verbosity(verbosity)
        return
    if not hasattr(scheduler, "sigmas") or not hasattr(scheduler, "alphas_cumprod"):
        raise ConfigError(f"{scheduler.__class__.__name__} cannot run a custom timestep grid")
    scheduler.set_timesteps(len(ts))
    cumprod = scheduler.alphas_cumprod.double().numpy()
    sigmas = ((1 - cumprod) / cumprod) ** 0.5
    grid = np.interp(ts, np.arange(len(sigmas)), sigmas)
    last = scheduler.sigmas[-1:].double()
    scheduler.sigmas = torch.cat([torch.from_numpy(grid), last]).to(scheduler.sigmas.dtype)
    scheduler.timesteps = torch.from_numpy(np.round(ts).astype(np.int64))


def scale_input(scheduler: Any, x: torch.Tensor, t: Any) -> torch.Tensor:
    """The scheduler's input scaling (flow-matching schedulers have none)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def is_flow(plan: SamplingPlan) -> bool:
    return plan.scheduler_class.startswith("FlowMatch")


def model_calls(plan: SamplingPlan) -> int:
    """Model calls of one pass of the loop: one per entry of the scheduler's timesteps, as every diffusers
    pipeline loops (PNDM's PLMS warm-up calls the model n + 1 times for n steps, Heun and KDPM2 2n - 1)."""
    return len(build_scheduler(plan).timesteps)


def check_plan(plan: SamplingPlan) -> None:
    """Everything a loop will ask of the scheduler, tried once on a tiny tensor before any real work; the
    plan's per-call policies hold one entry per model call."""
    scheduler = build_scheduler(plan)
    calls = len(scheduler.timesteps)
    refresh = plan.cache.refresh if plan.cache is not None else None
    for what, entries in (("guided_steps", plan.guided_steps), ("cache schedule", refresh)):
        if entries is not None and len(entries) != calls:
            raise ConfigError(f"{what} has {len(entries)} entries for the loop's {calls} model calls")
    try:
        x = torch.zeros(1, 1, 2, 2)
        t = scheduler.timesteps[0]
        scheduler.step(scale_input(scheduler, x, t), t, x)
    except Exception as exc:
        raise ConfigError(f"{plan.scheduler_class} cannot run this sampling loop ({one_line(exc, 300)})") from None


def with_scheduler(plan: SamplingPlan, name: str) -> SamplingPlan:
    """Swap the scheduler (alias or diffusers class name) as diffusers users write it,
    `X.from_config(pipe.scheduler.config)`: the new class reads what the old one's config set explicitly (its
    file's keys), never the old class's defaults, so SD's `leading` spacing and `set_alpha_to_one=False` carry
    over and the trained noise schedule is kept."""
    class_name, overrides = SCHEDULER_ALIASES.get(name.lower(), (name, {}))
    old = _from_config(scheduler_class(plan.scheduler_class), plan.scheduler_config)
    config = dict(old.config)
    config["_use_default_values"] = [k for k in config.get("_use_default_values", []) if k not in overrides]
    new = _from_config(scheduler_class(class_name), {**config, **overrides})
    return dataclasses.replace(
        plan, scheduler_class=class_name, scheduler_config=explicit_config(new), guided_steps=None, cache=None
    )


def explicit_config(scheduler: Any) -> dict[str, Any]:
    """What a scheduler's config sets rather than takes from its class defaults (diffusers records the
    defaulted keys in `_use_default_values`): what a `from_config` swap carries over, and what the plan keeps.
    A non-finite value is kept out when it is the class default (DPM-Solver's `lambda_min_clipped: -Infinity`,
    which diffusers writes into every such config): the plan stays plain JSON and the default restores it."""
    config = scheduler.config
    defaulted = set(config.get("_use_default_values", []))
    defaults = {k: p.default for k, p in inspect.signature(type(scheduler).__init__).parameters.items()}
    explicit = {}
    for key, value in config.items():
        if key.startswith("_") or key in defaulted:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            if value == defaults.get(key):
                continue
            raise ConfigError(f"scheduler {key} is {value}, which is not finite (only its class default may be)")
        explicit[key] = list(value) if isinstance(value, tuple) else value
    return explicit
