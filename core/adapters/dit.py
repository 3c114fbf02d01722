"""DiT (diffusers `DiTTransformer2DModel`): class-conditional through adaLN-Zero, a stack of
identical transformer blocks."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from core.adapters.base import BLOCK_RANGE, CROSS_HEADS, HEADS, MLP, Adapter
from core.cache_variants import TRACE, CacheVariant
from core.ir import CACHED, FULL, Conditioning


class DiTAdapter(Adapter):
    CAPS: ClassVar[dict[str, int]] = {
        "num_layers": 1024,
        "num_attention_heads": 1024,
        "attention_head_dim": 4096,
        "sample_size": 4096,
        "patch_size": 64,
        "in_channels": 4096,
        "out_channels": 4096,
        "num_embeds_ada_norm": 1_000_000,
    }
    block_stack: ClassVar[str | None] = "transformer_blocks"
    depth_field: ClassVar[str | None] = "num_layers"
    cache_cut: ClassVar[str | None] = BLOCK_RANGE
    prunable: ClassVar[tuple[str, ...]] = (HEADS, CROSS_HEADS, MLP)

    def cache_variant(
        self, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]
    ) -> nn.Module:
        return DiTCacheVariant(model, region, mode, condition_names)

    def conditioning(self, model: nn.Module) -> Conditioning:
        num = model.config.num_embeds_ada_norm
        rows = self.label_rows(model)
        return Conditioning(num_classes=num, null_class=num if rows > num else None)

    def label_rows(self, model: nn.Module) -> int:
        return model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        blocks = tuple(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks)))
        temporal = (*(f"{b}.norm1.{part}" for b in blocks for part in ("emb", "linear")), "proj_out_1")
        return blocks, temporal


class DiTCacheVariant(CacheVariant):
    """The DiTTransformer2DModel forward restated with blocks [first, stop) cacheable (FORA / Δ-DiT)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *inputs: torch.Tensor):
        sample, timestep, cond, cache = self.split(sample, timestep, inputs)
        class_labels = cond.get("class_labels")
        m, (first, stop) = self.model, self.region
        channels = sample.shape[1]
        h = m.pos_embed(sample)
        trace, entry = [h], h
        for k, block in enumerate(m.transformer_blocks):
            if k == first:
                entry = h
                if self.mode == CACHED:
                    h = h + cache
            if self.mode == CACHED and first <= k < stop:
                continue
            h = block(h, None, None, None, timestep, None, class_labels)
            trace.append(h)
            if k == stop - 1:
                residual = h - entry
        out = self._head(h, timestep, class_labels)
        out = out[:, :channels] if out.shape[1] == 2 * channels else out
        if self.mode == FULL:
            return out, residual
        if self.mode == TRACE:
            return out, trace
        return out

    def _head(self, h: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        m, p = self.model, self.model.patch_size
        conditioning = m.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
        shift, scale = m.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        h = m.proj_out_2(m.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
        side = int(h.shape[1] ** 0.5)
        h = h.reshape(-1, side, side, p, p, m.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, m.out_channels, side * p, side * p)


ADAPTER = DiTAdapter("dit", "DiTTransformer2DModel")
