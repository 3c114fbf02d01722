"""A family defined outside core.adapters, in this one file: a class-conditional transformer whose blocks
live in `layers` (no technique knows that name) and whose depth is the config field `depth`. Registering
its adapter (core.adapters.register) is all it takes for the techniques to run on it: they read its
description (block stack, cache cut, prunable units, token grid), never its name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from core.adapters.base import BLOCK_RANGE, HEADS, MLP, Adapter
from core.errors import LoadError
from core.ir import Conditioning


class StackNet(ModelMixin, ConfigMixin):
    """Patches -> tokens (+ a learned position, the timestep and the class embedded), `depth` diffusers
    BasicTransformerBlocks, a linear head back to patches."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        patch_size: int = 2,
        width: int = 32,
        heads: int = 2,
        depth: int = 4,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        tokens = (sample_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, width)
        self.class_embedding = nn.Embedding(num_classes + 1, width)  # the last row: unconditional
        self.layers = nn.ModuleList(BasicTransformerBlock(width, heads, width // heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_size * patch_size * in_channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = sample.shape
        p = self.config.patch_size
        h = self.patch(sample).flatten(2).transpose(1, 2) + self.position
        emb = self.time_embedding(self.time_proj(timestep).to(h.dtype)) + self.class_embedding(class_labels)
        h = h + emb[:, None]
        for block in self.layers:
            h = block(h)
        out = self.head(self.norm_out(h)).reshape(batch, height // p, width // p, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(batch, channels, height, width)


class StackNetAdapter(Adapter):
    CAPS: ClassVar[dict[str, int]] = {"depth": 64, "width": 1024, "heads": 64, "sample_size": 256}
    block_stack: ClassVar[str | None] = "layers"
    depth_field: ClassVar[str | None] = "depth"
    cache_cut: ClassVar[str | None] = BLOCK_RANGE
    prunable: ClassVar[tuple[str, ...]] = (HEADS, MLP)

    def build(self, config: dict[str, Any]) -> nn.Module:
        try:
            return StackNet.from_config(config)
        except Exception as exc:
            raise LoadError(f"invalid StackNet config: {exc}") from exc

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        return model(x, t, cond["class_labels"])

    def conditioning(self, model: nn.Module) -> Conditioning:
        return Conditioning(num_classes=model.config.num_classes, null_class=model.config.num_classes)

    def label_rows(self, model: nn.Module) -> int:
        return model.class_embedding.num_embeddings

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        blocks = tuple(f"layers.{i}" for i in range(len(model.layers)))
        return blocks, ("time_proj", "time_embedding", "class_embedding")


ADAPTER = StackNetAdapter("stack-net", "StackNet")
