"""Physical shrinking of diffusers modules: smaller weight tensors, not masks.

Each function keeps the listed output (or input) units of a layer and the matching units of the
layers coupled to it, so the pruned network computes exactly what the original computes with the
removed units' contributions set to zero.
"""

from __future__ import annotations

import torch
from torch import nn


def _index(keep: list[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sorted(int(i) for i in keep), dtype=torch.long)


def keep_outputs(layer: nn.Linear | nn.Conv2d, keep: torch.Tensor) -> None:
    """Keep output features / channels `keep` (dimension 0 of the weight and the bias)."""
    layer.weight = nn.Parameter(layer.weight.detach()[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def keep_inputs(layer: nn.Linear | nn.Conv2d, keep: torch.Tensor) -> None:
    """Keep input features / channels `keep` (dimension 1 of the weight)."""
    layer.weight = nn.Parameter(layer.weight.detach()[:, keep].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features = len(keep)
    else:
        layer.in_channels = len(keep)


def prune_heads(attn: nn.Module, keep_heads: list[int]) -> None:
    """A diffusers self-attention `Attention`: keep whole heads in q, k, v and the output projection."""
    head_dim = attn.inner_dim // attn.heads
    keep = _index([h * head_dim + d for h in sorted(keep_heads) for d in range(head_dim)])
    for proj in (attn.to_q, attn.to_k, attn.to_v):
        keep_outputs(proj, keep)
    keep_inputs(attn.to_out[0], keep)
    attn.heads = len(keep_heads)
    attn.inner_dim = attn.inner_kv_dim = len(keep)


def prune_mlp(ff: nn.Module, keep: list[int]) -> None:
    """A diffusers `FeedForward` (net = [activation with .proj, dropout, Linear]): keep hidden units.
    A gated activation (GEGLU, SD's) projects to [value, gate]: both halves keep the same units."""
    index = _index(keep)
    inner = ff.net[2].in_features
    halves = ff.net[0].proj.out_features // inner
    keep_outputs(ff.net[0].proj, torch.cat([index + h * inner for h in range(halves)]))
    keep_inputs(ff.net[2], index)


def prune_resnet(resnet: nn.Module, keep_groups: list[int]) -> None:
    """A diffusers `ResnetBlock2D`: keep whole GroupNorm groups of the inner channels (conv1 out, time
    projection, norm2, conv2 in). Whole groups keep the kept channels' normalization statistics exact."""
    norm = resnet.norm2
    size = norm.num_channels // norm.num_groups
    keep = _index([g * size + c for g in sorted(keep_groups) for c in range(size)])
    keep_outputs(resnet.conv1, keep)
    if resnet.time_emb_proj is not None:
        if resnet.time_embedding_norm == "scale_shift":  # emits [scale, shift], each over the inner channels
            keep_outputs(resnet.time_emb_proj, torch.cat([keep, keep + norm.num_channels]))
        else:
            keep_outputs(resnet.time_emb_proj, keep)
    norm.num_groups, norm.num_channels = len(keep_groups), len(keep)
    norm.weight = nn.Parameter(norm.weight.detach()[keep].clone())
    norm.bias = nn.Parameter(norm.bias.detach()[keep].clone())
    keep_inputs(resnet.conv2, keep)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` inside `root` (replacing what is there)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
