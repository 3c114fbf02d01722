"""Activation ranges from calibration inputs: per-input-channel min/max of every quantized layer (and the
output range of convolutions), and which layers read the same tensor (they share a quantizer and a smoothing)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calibration import selection
from core.adapters import Denoiser

BATCH = 64  # calibration inputs per forward


@torch.no_grad()
def observe(
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
        handles += [m.register_forward_hook(out_hook(n)) for n, m in targets.items() if not isinstance(m, nn.Linear)]
    try:
        for x, t, cond in inputs.batches(BATCH):
            denoiser.apply(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return stats, shared_inputs(denoiser, targets, inputs)


@torch.no_grad()
def shared_inputs(
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


def act_range(stat: dict[str, torch.Tensor], smooth: torch.Tensor | None) -> tuple[float, float]:
    lo, hi = stat["min"], stat["max"]
    if smooth is not None:
        lo, hi = lo / smooth, hi / smooth
    return float(lo.min()), float(hi.max())
