"""The sampling loop: diffusers schedulers + classifier-free guidance around any denoise function.

One loop serves every backend: `denoise` is a torch module call, an ONNX Runtime session, etc. A plan
with a cache schedule runs graph *variants* ("full" writes the carried tensors, "cached" reads them);
the loop owns the carried tensors, so every backend executes a plan the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError, one_line
from core.ir import DENOISER, Conditioning, SamplingPlan
from core.validate import is_int

# The denoiser's condition tensors by name (Conditioning.inputs), each with the batch first; {} if none.
Cond = Mapping[str, torch.Tensor]
# (x [B,C,H,W], t [B] float32, cond) -> model output [B,C,H,W]
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
# (x, t, cond, carried tensors in) -> (model output, carried tensors out): one graph variant
StepFn = Callable[
    [torch.Tensor, torch.Tensor, Cond, dict[str, torch.Tensor]],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]
Variants = Mapping[str, StepFn]
# (step index, t, model input x, model condition tensors, raw model output) for calibration capture
Observer = Callable[[int, torch.Tensor, torch.Tensor, Cond, torch.Tensor], None]


@dataclass(frozen=True)
class ConditionBatch:
    """The condition tensors of N samples, and of their unconditional branch (None: no guidance)."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None

    def guided(self) -> dict[str, torch.Tensor]:
        """The [cond, uncond] batch a guided step feeds the model."""
        if self.uncond is None:
            raise ValueError("no unconditional branch to guide with")
        return {k: torch.cat([v, self.uncond[k]]) for k, v in self.cond.items()}

    def rows(self, rows: Any) -> ConditionBatch:
        """The batch of some samples (an index, slice or index tensor)."""
        return ConditionBatch(take(self.cond, rows), None if self.uncond is None else take(self.uncond, rows))


def take(cond: Cond, rows: Any) -> dict[str, torch.Tensor]:
    """Rows of every condition tensor (an index, slice or index tensor over the batch)."""
    return {k: v[rows] for k, v in cond.items()}


def as_variants(denoise: DenoiseFn | Variants) -> Variants:
    """A plain denoise function is the single variant "denoiser", carrying nothing."""
    if isinstance(denoise, Mapping):
        return denoise
    return {DENOISER: lambda x, t, cond, carry: (denoise(x, t, cond), {})}


def run_variant(
    variants: Variants, name: str, x: torch.Tensor, t: torch.Tensor, cond: Cond, carry: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if name not in variants:
        raise ConfigError(f"the plan needs graph variant '{name}', which this backend lacks ({', '.join(variants)})")
    # Carried tensors from a guided step hold [cond, uncond]; an unguided step uses the cond half.
    carry = {k: v[: x.shape[0]] for k, v in carry.items()}
    return variants[name](x, t, cond, carry)


SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
}


# Solvers that run on any timestep grid (core.sampling.custom_timesteps): a searched schedule or a
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


def _from_config(cls: type, config: dict[str, Any]) -> Any:
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
    import numpy as np

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
    import numpy as np

    params = inspect.signature(scheduler.set_timesteps).parameters
    ts = np.asarray(timesteps, dtype=np.float64)
    train = scheduler.config.num_train_timesteps
    if scheduler.__class__.__name__.startswith("FlowMatch") or scheduler.config.get("use_flow_sigmas"):
        scheduler.set_timesteps(sigmas=ts / train)
        return
    if "timesteps" in params:
        scheduler.set_timesteps(timesteps=[round(t) for t in ts])
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


def signal_and_noise(scheduler: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) per timestep (train-timestep units, any real value): the model's input at t is a x0 + s noise.

    DDPM-type schedules: a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar), whether the loop keeps x in that
    form (DDPM, DDIM, PNDM, DPM-Solver) or in sigma form and scales it before the model (Euler, Heun, KDPM2:
    (x0 + sigma noise) / sqrt(sigma^2 + 1) is the same input). Between integer timesteps sigma is
    interpolated linearly, as Euler's `set_timesteps` does, so a fractional timestep of a plan gets the
    input its loop feeds (scheduler.add_noise would look it up in the last planned grid, or cast it to an
    integer). Flow matching: a = 1 - t / T, s = t / T."""
    if not hasattr(scheduler, "alphas_cumprod"):
        s = t.float() / scheduler.config.num_train_timesteps
        return 1 - s, s
    cumprod = scheduler.alphas_cumprod.float()
    t = t.double().clamp(0, len(cumprod) - 1)
    at = cumprod[t.round().long()]  # integer timesteps: exactly diffusers' add_noise
    a, s = at.sqrt(), (1 - at).sqrt()
    between = t != t.round()
    if bool(between.any()):
        sigmas = ((1 - cumprod.double()) / cumprod.double()).sqrt().numpy()
        sigma = torch.from_numpy(np.interp(t[between].numpy(), np.arange(len(sigmas)), sigmas))
        a[between] = (1 + sigma.square()).rsqrt().float()
        s[between] = (sigma * (1 + sigma.square()).rsqrt()).float()
    return a, s


def add_noise(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 noised to timesteps `t` as the model sees it there (signal_and_noise)."""
    a, s = (v.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) for v in signal_and_noise(scheduler, t))
    return a * x0 + s * noise


def training_target(
    scheduler: Any, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the denoiser predicts for add_noise(x0, noise, t): epsilon, v, x0, or the flow velocity."""
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "v_prediction":  # v = a noise - s x0 (Salimans & Ho 2022)
        a, s = (v.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) for v in signal_and_noise(scheduler, t))
        return a * noise - s * x0
    return x0 if prediction_type == "sample" else noise


def model_calls(plan: SamplingPlan) -> int:
    """Model calls of one pass of the loop: one per entry of the scheduler's timesteps, as every diffusers
    pipeline loops (PNDM's PLMS warm-up calls the model n + 1 times for n steps, Heun and KDPM2 2n - 1)."""
    return len(build_scheduler(plan).timesteps)


def check_plan(plan: SamplingPlan) -> None:
    """Everything a loop will ask of the scheduler, tried once on a tiny tensor before any real work; the
    plan's per-call policies hold one entry per model call."""
    scheduler = build_scheduler(plan)
    calls = len(scheduler.timesteps)
    for what, entries in (("guided_steps", plan.guided_steps), ("cache schedule", plan.cache and plan.cache.refresh)):
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


def uses_guidance(plan: SamplingPlan, conditioning: Conditioning) -> bool:
    return plan.guidance_scale > 1.0 and conditioning.supports_guidance


def network_evaluations(plan: SamplingPlan, conditioning: Conditioning) -> int:
    """Denoiser evaluations per image of the loop (NFE): one per model call, two on the guided ones."""
    calls = model_calls(plan)
    guided = sum(plan.guided(i) for i in range(calls)) if uses_guidance(plan, conditioning) else 0
    return calls + guided


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One generator per sample, so a sample depends on its seed alone (as diffusers' randn_tensor)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


def sample(
    plan: SamplingPlan,
    sample_shape: Sequence[int],
    denoise: DenoiseFn | Variants,
    seeds: Sequence[int],
    conditions: ConditionBatch | None = None,
    observer: Observer | None = None,
    progress: Callable[[Any], Any] = lambda it: it,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the loop; returns the final samples in model space (usually [-1, 1]).

    `conditions`: one row per seed (see core.conditions for how classes and prompts become tensors);
    guidance runs when the plan's scale is > 1 and the batch has an unconditional branch.
    `start` overrides the initial noise (already scaled), e.g. to replay a captured trajectory."""
    conditions = conditions or ConditionBatch({})
    if any(v.shape[0] != len(seeds) for v in conditions.cond.values()):
        raise ConfigError("the condition tensors need one row per seed")
    variants = as_variants(denoise)
    scheduler = build_scheduler(plan)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    x = initial_noise(sample_shape, generators) * sigma if start is None else start
    cfg = plan.guidance_scale > 1.0 and conditions.uncond is not None
    cond, cond_guided = conditions.cond, conditions.guided() if cfg else conditions.cond
    step_kwargs = _step_kwargs(scheduler, generators)
    carry: dict[str, torch.Tensor] = {}
    for i, t in enumerate(progress(scheduler.timesteps)):
        guided = cfg and plan.guided(i)
        x_in = scale_input(scheduler, x, t)
        if guided:
            x_in = torch.cat([x_in, x_in])
        c_in = cond_guided if guided else cond
        t_in = torch.full((x_in.shape[0],), float(t), dtype=torch.float32)
        out, written = run_variant(variants, plan.variant(i), x_in, t_in, c_in, carry)
        carry.update(written)
        if observer is not None:
            observer(i, t_in, x_in, c_in, out)
        x = scheduler.step(guide(out, plan.guidance_scale, guided), t, x, **step_kwargs).prev_sample
    return x


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """What diffusers' pipelines pass to `scheduler.step` besides the output (StableDiffusionPipeline's
    `prepare_extra_step_kwargs`): the per-sample generators of a stochastic sampler, and eta 0 where the step
    takes one (DDIM's default already; TCD's own default, 0.3, is not what its pipelines run)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {"generator": generators} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def guide(out: torch.Tensor, scale: float, guided: bool) -> torch.Tensor:
    """Classifier-free guidance on a [cond, uncond] batch; an unguided step's output is used as is."""
    if not guided:
        return out
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1], as diffusers pipelines post-process (NaN shows as black)."""
    return torch.nan_to_num(x / 2 + 0.5, nan=0.0).clamp(0, 1)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Model space [N, C, H, W] -> uint8 [N, H, W, C]: what `optimize sample` writes and the served
    pipeline returns."""
    return (to_images(x).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
