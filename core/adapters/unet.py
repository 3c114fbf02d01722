"""UNet (diffusers `UNet2DModel`): down and up blocks that change resolution, optional class embedding."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import Adapter
from core.ir import Conditioning


class UNetAdapter(Adapter):
    CAPS: ClassVar[dict[str, int]] = {
        "sample_size": 4096,
        "in_channels": 4096,
        "out_channels": 4096,
        "block_out_channels": 65536,
        "layers_per_block": 64,
        "attention_head_dim": 4096,
        "norm_num_groups": 4096,
        "num_class_embeds": 1_000_000,
        "num_train_timesteps": 100_000,
    }
    block_layout: ClassVar[str] = "channels"

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        """Class labels only for a class-conditional UNet (an unconditional one, the DDPM layout, refuses them)."""
        if config.get("num_class_embeds") is None and config.get("class_embed_type") is None:
            return {}
        return super().probe_conditions(config, device)

    def conditioning(self, model: nn.Module) -> Conditioning:
        # A plain UNet2DModel does not say which label (if any) is the unconditional one.
        return Conditioning(num_classes=model.config.num_class_embeds or 0, null_class=None)

    def label_rows(self, model: nn.Module) -> int:
        table = model.class_embedding
        return table.num_embeddings if isinstance(table, nn.Embedding) else 0

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        down = (f"down_blocks.{i}" for i in range(len(model.down_blocks)))
        up = (f"up_blocks.{i}" for i in range(len(model.up_blocks)))
        blocks = (*down, "mid_block", *up)
        temporal = ("time_proj", "time_embedding") + (("class_embedding",) if model.class_embedding else ())
        temporal += tuple(n for n, _ in model.named_modules() if n.endswith("time_emb_proj"))
        return blocks, temporal


ADAPTER = UNetAdapter("unet", "UNet2DModel")
