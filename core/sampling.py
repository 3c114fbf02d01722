"""The sampling loop: diffusers schedulers + classifier-free guidance around any denoise function.

One loop serves every backend: `denoise` is a torch module call, an ONNX Runtime session, etc. A plan
with a cache schedule runs graph *variants* ("full" writes the carried tensors, "cached" reads them);
the loop owns the carried tensors, so every backend executes a plan the same way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.ddpm_step import ddpm_steps
from core.errors import ConfigError
from core.ir import DENOISER, Conditioning, SamplingPlan
from core.schedulers import build_scheduler, model_calls, scale_input

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

    def to(self, device: str | torch.device) -> ConditionBatch:
        """Every tensor on `device` (the same tensors where they are there already)."""
        moved = lambda tensors: {k: v.to(device) for k, v in tensors.items()}  # noqa: E731
        return ConditionBatch(moved(self.cond), None if self.uncond is None else moved(self.uncond))


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
    device: str = "cpu",
) -> torch.Tensor:
    """Run the loop; returns the final samples in model space (usually [-1, 1]), on the host.

    `conditions`: one row per seed (see core.conditions for how classes and prompts become tensors);
    guidance runs when the plan's scale is > 1 and the batch has an unconditional branch.
    `start` overrides the initial noise (already scaled), e.g. to replay a captured trajectory.
    `device`: where the latents live between steps (a torch program's --device; float32 there). The noise is
    drawn on the host from per-seed CPU generators, as diffusers' randn_tensor does, so a seed gives the same
    sample on any device."""
    conditions = conditions or ConditionBatch({})
    if any(v.shape[0] != len(seeds) for v in conditions.cond.values()):
        raise ConfigError("the condition tensors need one row per seed")
    variants = as_variants(denoise)
    fast = ddpm_steps(plan)  # DDPM's step with its scalars computed once per plan (equal to diffusers')
    scheduler: Any = build_scheduler(plan) if fast is None else None
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    sigma = 1.0 if scheduler is None else getattr(scheduler, "init_noise_sigma", 1.0)
    x = (initial_noise(sample_shape, generators) * sigma if start is None else start).to(device)
    cfg = plan.guidance_scale > 1.0 and conditions.uncond is not None
    on_device = conditions.to(device)
    cond, cond_guided = on_device.cond, on_device.guided() if cfg else on_device.cond
    step_kwargs = {} if scheduler is None else _step_kwargs(scheduler, generators)
    carry: dict[str, torch.Tensor] = {}
    timesteps = scheduler.timesteps if fast is None else fast.timesteps
    for i, t in enumerate(progress(timesteps)):
        guided = cfg and plan.guided(i)
        x_in = x if scheduler is None else scale_input(scheduler, x, t)  # DDPM scales no input
        if guided:
            x_in = torch.cat([x_in, x_in])
        c_in = cond_guided if guided else cond
        t_in = torch.full((x_in.shape[0],), float(t), dtype=torch.float32, device=x.device)
        out, written = run_variant(variants, plan.variant(i), x_in, t_in, c_in, carry)
        carry.update(written)
        if observer is not None:
            observer(i, t_in, x_in, c_in, out)
        out = guide(out.to(x.device), plan.guidance_scale, guided)
        if fast is not None:
            x = fast.step(i, out, x, generators)
        else:
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x.cpu()


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """What diffusers' pipelines pass to `scheduler.step` besides the output (StableDiffusionPipeline's
    `prepare_extra_step_kwargs`): the per-sample generators of a stochastic sampler, and eta 0 where the step
    takes one (DDIM's default already; TCD's own default, 0.3, is not what its pipelines run)."""
    params = _step_parameters(scheduler.__class__)
    kwargs: dict[str, Any] = {"generator": generators} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


@functools.cache
def _step_parameters(scheduler_class: Any) -> frozenset[str]:
    """The parameter names of a scheduler class's `step` (read once per class: a policy samples per decision)."""
    return frozenset(inspect.signature(scheduler_class.step).parameters)


def guide(out: torch.Tensor, scale: float, guided: bool) -> torch.Tensor:
    """Classifier-free guidance on a [cond, uncond] batch; an unguided step's output is used as is."""
    if not guided:
        return out
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)
