"""SmoothQuant (Xiao et al. 2023; PTQ4DiT for diffusion transformers): per-channel factors that move activation
outliers into the weights, shared by the layers that read the same tensor."""

from __future__ import annotations

import torch
from torch import nn

from core.quantized import LayerFormat


def smoothing(
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
