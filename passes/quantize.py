"""Post-training quantization with timestep-aware calibration (network level).

1. Calibration inputs come from the captured trajectories, stratified over the plan's own timesteps
   (or PTQ4DM's skewed choice; "random" is the naive baseline, for comparisons).
2. Temporal-only modules (timestep/class embedding, adaLN modulation, time_emb_proj: functions of t
   and the label alone) stay fp32 (TFMQ's observation: these features are hypersensitive).
3. Optional SmoothQuant balancing (alpha) moves activation outliers into the weights (PTQ4DiT).
4. Every remaining layer of the family's quantizable types (Linear, Conv1d/2d/3d) becomes a QuantizedLayer
   with calibrated ranges.
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
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from calibration import selection
from core.adapters import adapter_for, denoiser_module
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
from core.schedulers import build_scheduler
from core.surgery import set_module
from passes.base import Context, Pass, PassResult, Phase, check_distribution_options
from passes.quantization.fallback import (
    ErrorJudge,
    ShiftJudge,
    error_measure,
    revert_most_sensitive,
    sensitivity_ranking,
)
from passes.quantization.formats import allocate_formats, allocation_markdown, format_options
from passes.quantization.ranges import act_range, observe
from passes.quantization.smoothquant import smoothing


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
    error_before_fallback: float  # of `measure`
    error_after_fallback: float
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
            f"- {self.measure}: {self.error_before_fallback:.4g} before fallback,"
            f" {self.error_after_fallback:.4g} after",
        ]
        if self.allocation:
            lines += allocation_markdown(self.allocation)
        elif self.fallback:
            lines += ["", "Layers reverted to fp32 (most sensitive first, each measured alone):", ""]
            lines += ["| layer | error when quantized alone | error after reverting |", "|---|---|---|"]
            lines += [f"| {f['layer']} | {f['solo_error']:.4g} | {f['error_after']:.4g} |" for f in self.fallback]
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
        raise ConfigError("quantize: no layers of the family's quantizable types left to quantize")
    inputs = selection.select(
        ctx.calibration,
        config.calibration,
        config.calibration_inputs,
        ctx.rng,
        build_scheduler(program.plan).config.num_train_timesteps,
        program.spec.conditioning.num_classes,
    )
    stats, groups = observe(denoiser, targets, inputs, outputs=config.activations == "uint8")
    formats = {
        name: _layer_format(layer, config, ctx.capabilities, _pinned(config.layer_weights, name))
        for name, layer in targets.items()
    }
    smooth = smoothing(targets, stats, groups, formats, config.smoothquant)
    builders: dict[str, Callable[[LayerFormat], QuantizedLayer]] = {}
    for name, layer in targets.items():
        s = smooth.get(name)
        lo, hi = act_range(stats[name], s)
        if s is not None:
            shape = (1, -1) + (1,) * (layer.weight.dim() - 2)  # input channels (a conv's over its kernel axes)
            layer.weight.data.mul_(s.reshape(shape))
        builders[name] = functools.partial(
            QuantizedLayer, layer, act_range=(lo, hi), smooth=s, out_range=stats[name].get("out")
        )
        set_module(model, name, builders[name](formats[name]))

    error = error_measure(
        program.replace(denoiser=model), denoiser, ctx.calibration, config.max_eps_error, config.max_sample_error
    )
    error_before = error.measure(error.rows)
    reverted: list[dict[str, Any]] = []
    error_after = error_before
    allocation = None
    ranking: dict[str, float] = {}
    over_budget = bool(error.budget) and error_before > error.budget
    if over_budget and config.fallback_formats:

        def layer_format(layer: nn.Module, weights: str) -> LayerFormat:
            return _layer_format(layer, config, ctx.capabilities, weights)

        options = format_options(model, program.denoiser, builders, config.fallback_formats, layer_format)
        error_after, reverted, allocation = allocate_formats(model, options, error, ctx.progress)
    elif over_budget:
        ranking = sensitivity_ranking(model, error, ctx.progress)
        reverted = revert_most_sensitive(
            model, program.denoiser, ranking, config.max_fallback, ErrorJudge(error, error_before)
        )
        error_after = reverted[-1]["error_after"] if reverted else error_before
    distribution = None
    if config.max_fd_shift_added:
        check = ctx.distribution_check(config.check_samples)
        judge = ShiftJudge(check, program.replace(denoiser=model), config.max_fd_shift_added, check.shift(program))
        limit = max(0, config.max_fallback - len(reverted))
        ranking = ranking or sensitivity_ranking(model, error, ctx.progress)
        distribution = judge.summary(revert_most_sensitive(model, program.denoiser, ranking, limit, judge))
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
        error_before_fallback=error_before,
        error_after_fallback=error_after,
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
        lines += [f"| {r['layer']} | {r['solo_error']:.4g} | {r['fd_shift_after']:.4g} |" for r in d["reverted"]]
    return lines


def _weight_bits(model: nn.Module) -> dict[str, int]:
    """Bits of weight storage: quantized layers at their format's width, everything else fp32."""
    quantized = quantized_layers(model)
    inside = {f"{n}.inner.weight" for n in quantized}
    total = sum(p.numel() * 32 for n, p in model.named_parameters() if n not in inside)
    low = sum(q.inner.weight.numel() * BITS[q.fmt.weights] for q in quantized.values())
    return {"fp32_equivalent": sum(p.numel() * 32 for p in model.parameters()), "stored": total + low}


PASS = Pass(name="quantize", phase=Phase.NUMERICS, config=Config, run=run, check=check)
