"""Per-layer formats by sensitivity + integer programming (modelopt's auto_quantize formulation): each option's
error measured alone, the fewest weight bits whose summed risks fit the budget, each choice checked on every
step."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from core.allocation import cheapest_within
from core.quantized import BITS, LayerFormat, QuantizedLayer, quantized_layers
from core.surgery import set_module
from passes.quantization.fallback import ErrorMeasure

MAX_SOLVES = 5  # integer programs per allocation (each checked on every step)


def format_options(
    model: nn.Module,
    original: nn.Module,
    builders: dict[str, Callable[[LayerFormat], QuantizedLayer]],
    fallback_formats: Sequence[str],
    layer_format: Callable[[nn.Module, str], LayerFormat],
) -> dict[str, dict[str, nn.Module]]:
    """Per quantized layer, its modules by weight format: its own, each of `fallback_formats` (as
    `layer_format(layer, weights)` makes it for this layer), fp32."""
    options = {}
    for name, layer in quantized_layers(model).items():
        mine: dict[str, nn.Module] = {layer.fmt.weights: layer}
        for weights in fallback_formats:
            fmt = layer_format(layer.inner, weights)
            if fmt.weights not in mine:
                mine[fmt.weights] = builders[name](fmt)
        mine["fp32"] = copy.deepcopy(original.get_submodule(name))
        options[name] = mine
    return options


def allocate_formats(
    model: nn.Module, options: dict[str, dict[str, nn.Module]], measured: ErrorMeasure, progress: Any
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
    reverted = [{"layer": n, "solo_error": solo[n][default[n]], "error_after": error} for n in fp32]
    allocation = {
        "method": "sensitivity + integer programming (scipy milp)",
        "options": sorted({k for ks in keys for k in ks}),
        "layers": len(names),
        "solves": len(tried),
        "tried": [{"weight_bits": b, "eps_error": e} for b, e, _ in tried],
        "assigned": {n: k for n, k in chosen.items() if k != default[n]},
        "solo_error": {n: solo[n] for n, k in chosen.items() if k != default[n]},
    }
    return error, reverted, allocation


def _stored_bits(module: nn.Module) -> int:
    if isinstance(module, QuantizedLayer):
        return module.inner.weight.numel() * BITS[module.fmt.weights]
    return module.weight.numel() * 32


def allocation_markdown(allocation: dict[str, Any]) -> list[str]:
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
            solo = ", ".join(f"{k}: {v:.3g}" for k, v in allocation["solo_error"][name].items())
            lines.append(f"| {name} | {key} | {solo} |")
    return lines
