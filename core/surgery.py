"""Physical shrinking of network modules: smaller weight tensors, not masks.

Each function keeps the listed output (or input) units of a layer and the matching units of the
layers coupled to it, so the pruned network computes exactly what the original computes with the
removed units' contributions set to zero. The sites (an MLP, a residual block's inner channels) are
described by the family adapters (core.adapters.base.Adapter.prunable_units), so this module names no
family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MlpSite:
    """An MLP's hidden units: `up`'s outputs (twice over for a gated activation: value and gate halves) and
    `down`'s inputs."""

    up: nn.Linear
    down: nn.Linear

    @classmethod
    def feed_forward(cls, ff: nn.Module) -> MlpSite:
        """A diffusers `FeedForward` (net = [activation with .proj, dropout, Linear])."""
        return cls(ff.net[0].proj, ff.net[2])


@dataclass(frozen=True)
class ChannelSite:
    """A residual block's inner channels: `conv1`'s outputs, normalized by `norm` (GroupNorm: whole groups
    go, so the kept channels' statistics are unchanged), modulated per channel by `modulation` (a Linear
    emitting `parts` vectors over the channels, e.g. scale then shift; None: none) and read by `conv2`.
    `resized`, if given, tells the block its new inner width (a forward that splits by it)."""

    conv1: nn.Module
    norm: nn.GroupNorm
    conv2: nn.Module
    modulation: nn.Linear | None = None
    parts: int = 1
    resized: Callable[[int], None] | None = None

    @classmethod
    def resnet(cls, resnet: nn.Module) -> ChannelSite:
        """A diffusers `ResnetBlock2D` (its time projection emits [scale, shift] for scale_shift norm)."""
        parts = 2 if resnet.time_embedding_norm == "scale_shift" else 1
        return cls(resnet.conv1, resnet.norm2, resnet.conv2, resnet.time_emb_proj, parts)


def _index(keep: list[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sorted(int(i) for i in keep), dtype=torch.long)


def keep_outputs(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep output features / channels `keep` (dimension 0 of the weight and the bias)."""
    layer.weight = nn.Parameter(layer.weight.detach()[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def keep_inputs(layer: nn.Module, keep: torch.Tensor) -> None:
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


def prune_mlp(site: MlpSite, keep: list[int]) -> None:
    """Keep hidden units `keep`; a gated activation's value and gate halves keep the same units."""
    index = _index(keep)
    inner = site.down.in_features
    halves = site.up.out_features // inner
    keep_outputs(site.up, torch.cat([index + h * inner for h in range(halves)]))
    keep_inputs(site.down, index)


def prune_channels(site: ChannelSite, keep_groups: list[int]) -> None:
    """Keep whole GroupNorm groups of the inner channels (conv1 out, the modulation's rows, norm, conv2 in)."""
    norm = site.norm
    size = norm.num_channels // norm.num_groups
    keep = _index([g * size + c for g in sorted(keep_groups) for c in range(size)])
    keep_outputs(site.conv1, keep)
    if site.modulation is not None:
        keep_outputs(site.modulation, torch.cat([keep + p * norm.num_channels for p in range(site.parts)]))
    norm.num_groups, norm.num_channels = len(keep_groups), len(keep)
    norm.weight = nn.Parameter(norm.weight.detach()[keep].clone())
    norm.bias = nn.Parameter(norm.bias.detach()[keep].clone())
    keep_inputs(site.conv2, keep)
    if site.resized is not None:
        site.resized(len(keep))


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` inside `root` (replacing what is there)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
