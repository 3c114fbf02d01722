"""Post-training quantization with timestep-aware calibration (network level).

1. Calibration inputs come from the captured trajectories, stratified over the plan's own timesteps
   (or PTQ4DM's skewed choice; "random" is the naive baseline, for comparisons).
2. Temporal-only modules (timestep/class embedding, adaLN modulation, time_emb_proj: functions of t
   and the label alone) stay fp32 (TFMQ's observation: these features are hypersensitive).
3. Optional SmoothQuant balancing (alpha) moves activation outliers into the weights (PTQ4DiT).
4. Every remaining Linear/Conv2d becomes a QuantizedLayer with calibrated ranges.
5. Fallback: if the teacher-forced noise-prediction error is over `max_eps_error`, the layers whose
   quantization alone hurts most (measured on 5 evenly spread steps) go back to fp32, worst first,
   until the error over every step is within budget. `max_sample_error` budgets the end-to-end error
   of the loop's samples instead (free-running on the calibration seeds): a few-step student's steps
   are large, and errors within a per-step budget still compound into a shifted distribution.
   With `fallback_formats` (e.g. FP8 for a W4A8 target), each layer's format is chosen instead among
   its own, those and fp32 by sensitivity + integer programming (modelopt's auto_quantize
   formulation): the fewest weight bits within the budget.
6. `max_fd_shift_added`: the distribution check (verify.floor_check, as the verification's denoiser-feature
   gate measures it) judges the quantized program against its unquantized input on the same seeds; while
   quantization adds more than this to the distribution shift, the most sensitive layers still quantized go
   back to fp32. An error budget on samples does not see this: on dit-digits' 4-step student, INT8 within
   0.05 relative sample error moved the distribution's mean (BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from calibration import selection
from core.adapters import Denoiser, adapter_for, denoiser_module
from core.allocation import cheapest_within
from core.conditions import encode
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from core.quantized import (
    ACTIVATION_FORMATS,
    BITS,
    CAPABILITY,
    FOUR_BIT,
    WEIGHT_FORMATS,
    LayerFormat,
    QuantizedLayer,
    quantized_layers,
)
from core.sampling import take
from core.schedulers import build_scheduler
from core.surgery import set_module
from core.variants import torch_loop
from passes.base import Context, Pass, PassResult, Phase, check_distribution_options
from verify.fidelity import per_step_error, replay_error

if TYPE_CHECKING:
    from verify.floor_check import FloorCheck

BATCH = 64


@dataclass
class Config:
    weights: str = "int8"  # int8 | fp8 | int4 | nvfp4
    activations: str = "uint8"  # none | uint8 | int8 | fp8 | nvfp4
    calibration: str = "timestep"  # timestep | skewed | random (naive baseline)
    calibration_inputs: int = 256
    keep_temporal: bool = True
    smoothquant: float = 0.0  # SmoothQuant alpha; 0 disables
    int4_block: int = 128  # shrunk to the largest power of two dividing each layer's input size
    max_eps_error: float = 0.0  # fallback budget (mean teacher-forced relative error); 0: no fallback
    # Fallback budget on the relative error of the loop's final samples vs the unquantized loop's, same
    # seeds and conditions (instead of max_eps_error; for few-step loops). 0: none.
    max_sample_error: float = 0.0
    max_fallback: int = 8
    exclude: list[str] = field(default_factory=list)  # module names (prefixes) kept fp32
    # Weight formats a layer may take instead of `weights`, before fp32, chosen per layer by sensitivity +
    # integer programming within max_eps_error (e.g. ["fp8"] for W4A8); empty: greedy fallback to fp32.
    fallback_formats: list[str] = field(default_factory=list)
    # Per-layer weight formats (module names or prefixes, like `exclude`; "fp32" keeps the layer fp32).
    layer_weights: dict[str, str] = field(default_factory=dict)
    # 7-bit int8 weights. ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) add pairs
    # of uint8 x int8 products in 16 bits (vpmaddubsw), which saturate with full-range weights; 7-bit
    # weights cannot (255 * 63 * 2 < 2^15). ORT's quantize_static calls this `reduce_range`.
    reduce_range: bool = False
    # Cross-attention K/V projections (attn2.to_k / to_v) read the prompt embeddings, which are the same at
    # every step: they cost L tokens per call, not H*W, so they stay fp32 by default ("fp32"); "quantize"
    # treats them like every other layer.
    cross_kv: str = "fp32"
    # The distribution shift quantization may add to its input program's, both measured by the distribution
    # check on its own seeds (0: not checked); reverting layers to fp32 (most sensitive first, at most
    # max_fallback in all) until it holds.
    max_fd_shift_added: float = 0.0
    check_samples: int = 100


@dataclass(frozen=True)
class QuantizeDecision(Decision):
    formats: dict[str, int]  # layer format -> how many layers
    quantized_layers: int
    kept_fp32: list[str]
    fallback: list[dict[str, Any]]  # layers reverted to fp32 for the error budget, most sensitive first
    eps_error_before_fallback: float  # of `measure`
    eps_error_after_fallback: float
    calibration: dict[str, Any]
    smoothquant_alpha: float
    smoothed_layers: int
    weight_bits: dict[str, int]
    notes: list[str] = field(default_factory=list)
    allocation: dict[str, Any] | None = None  # per-layer formats by integer programming (fallback_formats)
    measure: str = "teacher-forced model-output error on calibration trajectories"
    # The distribution check (max_fd_shift_added): the input's and the quantized program's shifts, the bound,
    # the original's own FD to the check's floor set, and the shift after each layer reverted for it.
    distribution: dict[str, Any] | None = None

    title = "Quantization"

    def markdown(self) -> list[str]:
        bits = self.weight_bits
        lines = [
            f"- layers: {self.quantized_layers} quantized ({', '.join(f'{k}: {v}' for k, v in self.formats.items())})",
            f"- kept fp32 (temporal-only or excluded): {', '.join(self.kept_fp32) or 'none'}",
            f"- calibration: {self.calibration['method']}, {self.calibration['inputs']} denoiser inputs;"
            f" SmoothQuant alpha {self.smoothquant_alpha} on {self.smoothed_layers} layers",
            f"- weight storage: {bits['stored'] / 8e6:.2f} MB vs {bits['fp32_equivalent'] / 8e6:.2f} MB fp32",
            f"- {self.measure}: {self.eps_error_before_fallback:.4g} before fallback,"
            f" {self.eps_error_after_fallback:.4g} after",
        ]
        if self.allocation:
            lines += _allocation_markdown(self.allocation)
        elif self.fallback:
            lines += ["", "Layers reverted to fp32 (most sensitive first, each measured alone):", ""]
            lines += ["| layer | error when quantized alone | error after reverting |", "|---|---|---|"]
            lines += [
                f"| {f['layer']} | {f['solo_eps_error']:.4g} | {f['eps_error_after']:.4g} |" for f in self.fallback
            ]
        if self.distribution:
            lines += _distribution_markdown(self.distribution)
        lines += [f"- {note}" for note in self.notes]
        return lines


def check(config: Config, capabilities: frozenset[str]) -> None:
    if config.cross_kv not in ("fp32", "quantize"):
        raise ConfigError(f"quantize: cross_kv is 'fp32' or 'quantize', got {config.cross_kv!r}")
    if config.weights not in WEIGHT_FORMATS:
        raise ConfigError(f"quantize: unknown weight format '{config.weights}' (known: {', '.join(WEIGHT_FORMATS)})")
    if config.activations not in ACTIVATION_FORMATS:
        raise ConfigError(
            f"quantize: unknown activation format '{config.activations}' (known: {', '.join(ACTIVATION_FORMATS)})"
        )
    pinned = [w for w in config.layer_weights.values() if w != "fp32"]
    for kind in pinned + config.fallback_formats:
        if kind not in WEIGHT_FORMATS:
            raise ConfigError(f"quantize: unknown weight format '{kind}' (known: {', '.join(WEIGHT_FORMATS)}, fp32)")
    for kind in (config.weights, config.activations, *pinned, *config.fallback_formats):
        if kind != "none" and CAPABILITY[kind] not in capabilities:
            raise ConfigError(
                f"quantize: {kind} needs the '{CAPABILITY[kind]}' capability, which this target lacks "
                f"(it has: {', '.join(sorted(capabilities))})"
            )
    if config.activations == "nvfp4" and config.weights != "nvfp4":
        raise ConfigError("quantize: nvfp4 activations need nvfp4 weights (W4A4)")
    if config.calibration not in selection.METHODS:
        raise ConfigError(f"quantize: calibration must be one of {', '.join(selection.METHODS)}")
    if not 0.0 <= config.smoothquant < 1.0:
        raise ConfigError("quantize: smoothquant alpha must be in [0, 1)")
    budgets = (config.max_eps_error, config.max_sample_error)
    if not 1 <= config.calibration_inputs <= MAX_INPUTS or config.max_fallback < 0 or min(budgets) < 0:
        raise ConfigError(
            f"quantize: calibration_inputs in [1, {MAX_INPUTS}], max_fallback >= 0 and error budgets >= 0"
        )
    if min(budgets) > 0:
        raise ConfigError("quantize: set max_eps_error (per step) or max_sample_error (end to end), not both")
    check_distribution_options("quantize", config.max_fd_shift_added, config.check_samples, "max_fd_shift_added")
    if not 8 <= config.int4_block <= 4096 or config.int4_block & (config.int4_block - 1):
        raise ConfigError("quantize: int4_block must be a power of two in [8, 4096]")


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    model = copy.deepcopy(program.denoiser).eval()
    denoiser = denoiser_module(program.replace(denoiser=model))
    kept = _kept_fp32(program, config) | {n for n, w in config.layer_weights.items() if w == "fp32"}
    kinds = adapter_for(program.spec.model_class).quantizable
    targets = {
        name: m for name, m in model.named_modules() if isinstance(m, kinds) and not any(_under(name, k) for k in kept)
    }
    if not targets:
        raise ConfigError("quantize: no Linear/Conv2d layers left to quantize")
    inputs = selection.select(
        ctx.calibration,
        config.calibration,
        config.calibration_inputs,
        ctx.rng,
        build_scheduler(program.plan).config.num_train_timesteps,
        program.spec.conditioning.num_classes,
    )
    stats, groups = _observe(denoiser, targets, inputs, outputs=config.activations == "uint8")
    formats = {
        name: _layer_format(layer, config, ctx.capabilities, _pinned(config.layer_weights, name))
        for name, layer in targets.items()
    }
    smooth = _smoothing(targets, stats, groups, formats, config.smoothquant)
    builders: dict[str, Callable[[LayerFormat], QuantizedLayer]] = {}
    for name, layer in targets.items():
        s = smooth.get(name)
        lo, hi = _range(stats[name], s)
        if s is not None:
            shape = (1, -1) if isinstance(layer, nn.Linear) else (1, -1, 1, 1)
            layer.weight.data.mul_(s.reshape(shape))
        builders[name] = functools.partial(
            QuantizedLayer, layer, act_range=(lo, hi), smooth=s, out_range=stats[name].get("out")
        )
        set_module(model, name, builders[name](formats[name]))

    error = _error(program.replace(denoiser=model), denoiser, ctx.calibration, config)
    error_before = error.measure(error.rows)
    reverted: list[dict[str, Any]] = []
    error_after = error_before
    allocation = None
    ranking: dict[str, float] = {}
    over_budget = bool(error.budget) and error_before > error.budget
    if over_budget and config.fallback_formats:
        options = _options(model, program.denoiser, builders, config, ctx.capabilities)
        error_after, reverted, allocation = _allocate(model, options, error, config, ctx.progress)
    elif over_budget:
        ranking = _ranking(model, error, ctx.progress)
        reverted = _fallback(model, program.denoiser, ranking, config.max_fallback, _ErrorJudge(error, error_before))
        error_after = reverted[-1]["eps_error_after"] if reverted else error_before
    distribution = None
    if config.max_fd_shift_added:
        check = ctx.distribution_check(config.check_samples)
        judge = _ShiftJudge(check, program.replace(denoiser=model), config.max_fd_shift_added, check.shift(program))
        limit = max(0, config.max_fallback - len(reverted))
        ranking = ranking or _ranking(model, error, ctx.progress)
        distribution = judge.summary(_fallback(model, program.denoiser, ranking, limit, judge))
        distribution["samples"] = config.check_samples
        error_after = error.measure(error.rows) if distribution["reverted"] else error_after

    layers = quantized_layers(model)
    counts: dict[str, int] = {}
    for layer in layers.values():
        counts[layer.fmt.describe()] = counts.get(layer.fmt.describe(), 0) + 1
    decision = QuantizeDecision(
        formats=counts,
        quantized_layers=len(layers),
        kept_fp32=sorted(kept),
        fallback=reverted,
        eps_error_before_fallback=error_before,
        eps_error_after_fallback=error_after,
        calibration={"method": config.calibration, "inputs": int(inputs.x.shape[0])},
        smoothquant_alpha=config.smoothquant,
        smoothed_layers=len(smooth),
        weight_bits=_weight_bits(model),
        allocation=allocation,
        measure=error.name,
        distribution=distribution,
    )
    return PassResult(program.replace(denoiser=model), decision)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _kept_fp32(program: DiffusionProgram, config: Config) -> set[str]:
    kept = set(config.exclude)
    if config.keep_temporal:
        kept |= set(program.spec.temporal_modules)
    if config.cross_kv == "fp32":
        kept |= set(adapter_for(program.spec.model_class).prompt_projections(program.denoiser))
    return kept


def _pinned(layer_weights: dict[str, str], name: str) -> str | None:
    """The weight format pinned for this layer (the longest matching prefix), if any."""
    matches = [prefix for prefix in layer_weights if _under(name, prefix)]
    return layer_weights[max(matches, key=len)] if matches else None


def _layer_format(
    layer: nn.Module, config: Config, capabilities: frozenset[str], weights: str | None = None
) -> LayerFormat:
    weights, activations = weights or config.weights, config.activations
    if weights in FOUR_BIT and not isinstance(layer, nn.Linear):
        # 4-bit block formats cover Linear layers; convolutions keep 8 bits of the best kind the target has.
        weights = "fp8" if "fp8" in capabilities else "int8"
        activations = weights if activations == "nvfp4" else activations
    block = 0
    if weights == "int4":
        block = config.int4_block
        while layer.weight.shape[1] % block:
            block //= 2
        if block < 8:
            raise ConfigError(f"quantize: input size {layer.weight.shape[1]} has no int4 block size >= 8")
    if weights == "nvfp4" and layer.weight.shape[1] % 16:
        raise ConfigError(f"quantize: NVFP4 needs input sizes divisible by 16, got {layer.weight.shape[1]}")
    return LayerFormat(weights, activations, block, 7 if weights == "int8" and config.reduce_range else 8)


@torch.no_grad()
def _observe(
    denoiser: Denoiser, targets: dict[str, nn.Module], inputs: selection.CalibrationInputs, outputs: bool
) -> tuple[dict[str, dict[str, Any]], list[list[str]]]:
    """Per layer: per-input-channel min/max over all calibration inputs (and the output range of convs
    when `outputs`); and groups of layers that read the same tensor."""
    stats: dict[str, dict[str, Any]] = {}

    def hook(name: str, linear: bool):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            flat = x.reshape(-1, x.shape[-1]) if linear else x.transpose(0, 1).reshape(x.shape[1], -1).T
            lo, hi = flat.amin(dim=0), flat.amax(dim=0)
            if name not in stats:
                stats[name] = {"min": lo, "max": hi}
            else:
                stats[name]["min"] = torch.minimum(stats[name]["min"], lo)
                stats[name]["max"] = torch.maximum(stats[name]["max"], hi)

        return record

    def out_hook(name: str):
        def record(_module: nn.Module, _args: Any, y: torch.Tensor) -> None:
            lo, hi = stats[name].get("out", (0.0, 0.0))
            stats[name]["out"] = (min(lo, float(y.min())), max(hi, float(y.max())))

        return record

    handles = [m.register_forward_pre_hook(hook(n, isinstance(m, nn.Linear))) for n, m in targets.items()]
    if outputs:
        handles += [m.register_forward_hook(out_hook(n)) for n, m in targets.items() if isinstance(m, nn.Conv2d)]
    try:
        for x, t, cond in inputs.batches(BATCH):
            denoiser.apply(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return stats, _shared_inputs(denoiser, targets, inputs)


@torch.no_grad()
def _shared_inputs(
    denoiser: Denoiser, targets: dict[str, nn.Module], inputs: selection.CalibrationInputs
) -> list[list[str]]:
    """Groups of layers that read the same tensor, from one forward on one input row (the inputs are kept
    alive until it ends so that their ids stay unique; one row keeps that cheap at any resolution)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(name, args[0])

        return record

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in targets.items()]
    try:
        denoiser.apply(*inputs.rows(torch.tensor([0])))
    finally:
        for h in handles:
            h.remove()
    by_input: dict[int | str, list[str]] = {}
    for name in targets:
        by_input.setdefault(id(seen[name]) if name in seen else name, []).append(name)
    return list(by_input.values())


def _smoothing(
    targets: dict[str, nn.Module],
    stats: dict[str, dict[str, torch.Tensor]],
    groups: list[list[str]],
    formats: dict[str, LayerFormat],
    alpha: float,
) -> dict[str, torch.Tensor]:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha), shared by layers that read the same tensor."""
    if not alpha:
        return {}
    smooth = {}
    for group in groups:
        if any(formats[n].activations in ("none", "nvfp4") or targets[n].weight.dim() != 2 for n in group):
            continue
        act = torch.maximum(stats[group[0]]["max"].abs(), stats[group[0]]["min"].abs())
        w = torch.stack([targets[n].weight.detach().abs().amax(dim=0) for n in group]).amax(dim=0)
        s = (act.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-2, max=1e2)
        for n in group:
            smooth[n] = s
    return smooth


def _range(stat: dict[str, torch.Tensor], smooth: torch.Tensor | None) -> tuple[float, float]:
    lo, hi = stat["min"], stat["max"]
    if smooth is not None:
        lo, hi = lo / smooth, hi / smooth
    return float(lo.min()), float(hi.max())


@dataclass(frozen=True)
class _Error:
    """What the fallback keeps within budget: `measure` on `rows` (the calibration rows it checks), each
    option's solo error on `probe` (fewer steps, when a step can be measured alone)."""

    name: str
    budget: float
    measure: Callable[[Any], float]
    rows: Any
    probe: Any


ROWS = 16  # calibration rows (or seeds) on which errors are measured


def _error(quantized: DiffusionProgram, denoiser: Denoiser, traj: Any, config: Config) -> _Error:
    """Teacher-forced per step (max_eps_error), or end to end on the loop's samples (max_sample_error)."""
    if not config.max_sample_error:
        rows = _subset(traj, ROWS)
        name = "teacher-forced model-output error on calibration trajectories"
        measure: Callable[[Any], float] = functools.partial(_eps_error, denoiser)
        return _Error(name, config.max_eps_error, measure, rows, _steps_subset(rows, SENSITIVITY_STEPS))
    seeds = _seeds_subset(traj, ROWS)
    loop, batch = torch_loop(quantized), encode(quantized, seeds.conditions, len(seeds.seeds))
    name = "end-to-end error of the loop's samples on calibration seeds (free-running)"
    measure = lambda t: replay_error(quantized, t, loop, batch)  # noqa: E731
    return _Error(name, config.max_sample_error, measure, seeds, seeds)


def _seeds_subset(traj: Any, rows: int) -> Any:
    """The trajectories' first `rows` seeds with their conditions and finals (what a replay needs)."""
    n = min(rows, len(traj.seeds))
    conditions = None if traj.conditions is None else traj.conditions[:n]
    return dataclasses.replace(traj, seeds=traj.seeds[:n], conditions=conditions, final=traj.final[:n])


def _subset(traj: Any, rows: int) -> Any:
    """The calibration trajectories on `rows` evenly spread rows (both guidance halves), for quick checks."""
    n = traj.x.shape[1]
    pick = torch.linspace(0, n - 1, min(rows, n)).round().long()
    return dataclasses.replace(traj, x=traj.x[:, pick], output=traj.output[:, pick], cond=take(traj.cond, pick))


def _steps_subset(traj: Any, steps: int) -> Any:
    """The trajectories at `steps` evenly spread steps (first and last included)."""
    pick = torch.linspace(0, traj.steps - 1, min(steps, traj.steps)).round().long().unique()
    return dataclasses.replace(traj, x=traj.x[pick], t=traj.t[pick], output=traj.output[pick])


def _eps_error(denoiser: Denoiser, traj: Any) -> float:
    """Mean over steps of the teacher-forced relative error of the model output."""
    errors = per_step_error(traj, torch.no_grad()(denoiser.apply))
    return sum(errors) / len(errors)


SENSITIVITY_STEPS = 5  # steps of the loop on which each layer's solo error is measured


def _ranking(model: nn.Module, measured: _Error, progress: Any) -> dict[str, float]:
    """Each quantized layer's error when it alone is quantized (on the probe): the fallback's order."""
    layers = quantized_layers(model)
    for layer in layers.values():
        layer.emulate = False
    solo = {}
    for name, layer in progress(layers.items(), desc="quantize: layer sensitivity", leave=False):
        layer.emulate = True
        solo[name] = measured.measure(measured.probe)  # the ranking only; the budget is checked on all rows
        layer.emulate = False
    for layer in layers.values():
        layer.emulate = True
    return solo


class _ErrorJudge:
    """The fallback's condition for an error budget: the error on every row over it."""

    def __init__(self, measured: _Error, value: float) -> None:
        self.measured, self.value = measured, value

    def over(self) -> bool:
        return self.value > self.measured.budget

    def after_revert(self) -> dict[str, float]:
        self.value = self.measured.measure(self.measured.rows)
        return {"eps_error_after": self.value}


class _ShiftJudge:
    """The fallback's condition for the distribution check: the quantized program's shift beyond its input's."""

    def __init__(self, check: FloorCheck, quantized: DiffusionProgram, added: float, before: float) -> None:
        self.check, self.quantized, self.added, self.before = check, quantized, added, before
        self.first = self.value = check.shift(quantized)

    def over(self) -> bool:
        return self.value - self.before > self.added

    def after_revert(self) -> dict[str, float]:
        self.value = self.check.shift(self.quantized)  # the model is reverted in place
        return {"fd_shift_after": self.value}

    def summary(self, reverted: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "input_shift": self.before,
            "quantized_shift": self.first,
            "final_shift": self.value,
            "max_added": self.added,
            "held": not self.over(),
            "floor_fd": self.check.floor,
            "reverted": reverted,
        }


def _fallback(
    model: nn.Module, original: nn.Module, ranking: dict[str, float], limit: int, judge: _ErrorJudge | _ShiftJudge
) -> list[dict[str, Any]]:
    """Revert the layers still quantized, most sensitive first (`ranking`), to fp32 while `judge` is over
    its bound, at most `limit` of them."""
    quantized = quantized_layers(model)
    reverted: list[dict[str, Any]] = []
    for name in sorted((n for n in ranking if n in quantized), key=lambda n: ranking[n], reverse=True):
        if len(reverted) >= limit or not judge.over():
            break
        set_module(model, name, copy.deepcopy(original.get_submodule(name)))
        reverted.append({"layer": name, "solo_eps_error": ranking[name], **judge.after_revert()})
    return reverted


def _distribution_markdown(d: dict[str, Any]) -> list[str]:
    lines = [
        f"- distribution check ({d['samples']} samples; the shift as the verification's denoiser-feature gate"
        f" measures it; the original's own FD to the floor set {d['floor_fd']:.4g}): input {d['input_shift']:.4g},"
        f" quantized {d['quantized_shift']:.4g}, after fallback {d['final_shift']:.4g}; quantization may add"
        f" {d['max_added']:g}" + ("" if d["held"] else " -- not reached within max_fallback; the verification judges")
    ]
    if d["reverted"]:
        lines += ["", "| layer reverted for the distribution | error when quantized alone | shift after |"]
        lines += ["|---|---|---|"]
        lines += [f"| {r['layer']} | {r['solo_eps_error']:.4g} | {r['fd_shift_after']:.4g} |" for r in d["reverted"]]
    return lines


MAX_SOLVES = 5  # integer programs per allocation (each checked on every step)


def _options(
    model: nn.Module,
    original: nn.Module,
    builders: dict[str, Callable[[LayerFormat], QuantizedLayer]],
    config: Config,
    capabilities: frozenset[str],
) -> dict[str, dict[str, nn.Module]]:
    """Per quantized layer, its modules by weight format: its own, each of `fallback_formats`, fp32."""
    options = {}
    for name, layer in quantized_layers(model).items():
        mine: dict[str, nn.Module] = {layer.fmt.weights: layer}
        for weights in config.fallback_formats:
            fmt = _layer_format(layer.inner, config, capabilities, weights)
            if fmt.weights not in mine:
                mine[fmt.weights] = builders[name](fmt)
        mine["fp32"] = copy.deepcopy(original.get_submodule(name))
        options[name] = mine
    return options


def _allocate(
    model: nn.Module, options: dict[str, dict[str, nn.Module]], measured: _Error, config: Config, progress: Any
) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    """Per-layer formats by sensitivity + integer programming. Each option's error is measured alone (every
    other layer fp32; per step: on 5 steps); its risk is the increase of the squared error (independent errors add in
    squares, not in norms). `cheapest_within` picks the fewest weight bits whose summed risks fit a budget;
    each choice is checked on every step and the budget rescaled by measured / predicted, a few times; the
    cheapest choice within budget is kept (else the most accurate)."""
    default = {name: next(iter(mine)) for name, mine in options.items()}
    for name, mine in options.items():
        set_module(model, name, mine["fp32"])
    base = measured.measure(measured.probe)
    solo: dict[str, dict[str, float]] = {}
    for name, mine in progress(options.items(), desc="quantize: sensitivity per layer and format", leave=False):
        solo[name] = {"fp32": base}
        for key, module in mine.items():
            if key != "fp32":
                set_module(model, name, module)
                solo[name][key] = measured.measure(measured.probe)
        set_module(model, name, mine["fp32"])
    names = list(options)
    keys = [list(options[n]) for n in names]
    bits = [[_stored_bits(options[n][k]) for k in ks] for n, ks in zip(names, keys, strict=True)]
    risks = [[max(solo[n][k] ** 2 - base**2, 0.0) for k in ks] for n, ks in zip(names, keys, strict=True)]
    room = measured.budget**2 - base**2  # what the summed risks may add
    budget = room
    tried: list[tuple[Any, ...]] = []  # (bits, error, choice)
    for _ in range(MAX_SOLVES):
        picks = cheapest_within(bits, risks, budget)
        if any(picks == t[2] for t in tried):  # the rescaled budget changed nothing
            break
        for name, ks, j in zip(names, keys, picks, strict=True):
            set_module(model, name, options[name][ks[j]])
        error = measured.measure(measured.rows)
        tried.append((sum(b[j] for b, j in zip(bits, picks, strict=True)), error, picks))
        predicted = sum(r[j] for r, j in zip(risks, picks, strict=True))
        increase = max(error**2 - base**2, 1e-12)
        if predicted <= 0 or (error <= measured.budget and increase >= 0.8 * room):
            break
        budget = predicted * room / increase * (1.0 if error <= measured.budget else 0.95)
    within = [t for t in tried if t[1] <= measured.budget]
    _, error, picks = min(within) if within else min(tried, key=lambda t: t[1])
    chosen = {n: ks[j] for n, ks, j in zip(names, keys, picks, strict=True)}
    for name, key in chosen.items():
        set_module(model, name, options[name][key])
    fp32 = sorted((n for n, k in chosen.items() if k == "fp32"), key=lambda n: solo[n][default[n]], reverse=True)
    reverted = [{"layer": n, "solo_eps_error": solo[n][default[n]], "eps_error_after": error} for n in fp32]
    allocation = {
        "method": "sensitivity + integer programming (scipy milp)",
        "options": sorted({k for ks in keys for k in ks}),
        "layers": len(names),
        "solves": len(tried),
        "tried": [{"weight_bits": b, "eps_error": e} for b, e, _ in tried],
        "assigned": {n: k for n, k in chosen.items() if k != default[n]},
        "solo_eps_error": {n: solo[n] for n, k in chosen.items() if k != default[n]},
    }
    return error, reverted, allocation


def _stored_bits(module: nn.Module) -> int:
    if isinstance(module, QuantizedLayer):
        return module.inner.weight.numel() * BITS[module.fmt.weights]
    return module.weight.numel() * 32


def _allocation_markdown(allocation: dict[str, Any]) -> list[str]:
    assigned = allocation["assigned"]
    tried = ", ".join(f"{t['weight_bits'] / 8e6:.3f} MB at {t['eps_error']:.4g}" for t in allocation["tried"])
    lines = [
        "",
        f"Per-layer formats by {allocation['method']}: {allocation['layers']} layers, options"
        f" {', '.join(allocation['options'])}; {allocation['solves']} solve(s) checked on every step"
        f" ({tried});"
        f" {len(assigned)} layers off their default format (the fewest weight bits within the budget):",
    ]
    if assigned:
        lines += ["", "| layer | format | error when alone in each format (5 steps) |", "|---|---|---|"]
        for name, key in assigned.items():
            solo = ", ".join(f"{k}: {v:.3g}" for k, v in allocation["solo_eps_error"][name].items())
            lines.append(f"| {name} | {key} | {solo} |")
    return lines


def _weight_bits(model: nn.Module) -> dict[str, int]:
    """Bits of weight storage: quantized layers at their format's width, everything else fp32."""
    quantized = quantized_layers(model)
    inside = {f"{n}.inner.weight" for n in quantized}
    total = sum(p.numel() * 32 for n, p in model.named_parameters() if n not in inside)
    low = sum(q.inner.weight.numel() * BITS[q.fmt.weights] for q in quantized.values())
    return {"fp32_equivalent": sum(p.numel() * 32 for p in model.parameters()), "stored": total + low}


PASS = Pass(name="quantize", phase=Phase.NUMERICS, config=Config, run=run, check=check)
