"""DiT (diffusers `DiTTransformer2DModel`): class-conditional through adaLN-Zero, a stack of
identical transformer blocks."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from core.adapters.base import Adapter
from core.ir import Conditioning


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


ADAPTER = DiTAdapter("dit", "DiTTransformer2DModel")
