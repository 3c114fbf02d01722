"""UNet (diffusers `UNet2DModel`): down and up blocks that change resolution, optional class embedding."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import CHANNELS, UNET_LEVELS, Adapter
from core.cache_variants import TRACE, CacheVariant
from core.ir import CACHED, FULL, Conditioning


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
    cache_cut: ClassVar[str | None] = UNET_LEVELS
    prunable: ClassVar[tuple[str, ...]] = (CHANNELS,)

    def cache_variant(
        self, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]
    ) -> nn.Module:
        return UNetCacheVariant(model, region, mode, condition_names)

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


class UNetCacheVariant(CacheVariant):
    """The UNet2DModel forward restated with levels [first, n) cacheable (DeepCache)."""

    def _embedding(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels) -> torch.Tensor:
        m = self.model
        timesteps = timestep * torch.ones(sample.shape[0], dtype=timestep.dtype)
        emb = m.time_embedding(m.time_proj(timesteps).to(dtype=m.dtype))
        if m.class_embedding is not None:
            labels = m.time_proj(class_labels) if m.config.class_embed_type == "timestep" else class_labels
            emb = emb + m.class_embedding(labels).to(dtype=m.dtype)
        return emb

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *inputs: torch.Tensor):
        sample, timestep, cond, cache = self.split(sample, timestep, inputs)
        class_labels = cond.get("class_labels")
        m, (first, _) = self.model, self.region
        n = len(m.down_blocks)
        emb = self._embedding(sample, timestep, class_labels)
        h = m.conv_in(sample)
        res: tuple[torch.Tensor, ...] = (h,)
        for k, block in enumerate(m.down_blocks):
            if self.mode == CACHED and k >= first:
                break
            h, block_res = block(hidden_states=h, temb=emb)
            res += block_res
        trace = []
        if self.mode == CACHED:
            # Keep only the skip tensors the recomputed up blocks consume (the deepest ones went to cached levels).
            res = res[: sum(len(b.resnets) for b in m.up_blocks[n - first :])]
            h = cache
        elif m.mid_block is not None:
            h = m.mid_block(h, emb)
        for j, block in enumerate(m.up_blocks):
            if self.mode == CACHED and j < n - first:
                continue
            trace.append(h)
            if j == n - first:
                feature = h
            block_res, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
            h = block(h, block_res, emb)
        out = m.conv_out(m.conv_act(m.conv_norm_out(h)))
        if m.config.time_embedding_type == "fourier":
            out = out / timestep.reshape(-1, 1, 1, 1)
        if self.mode == FULL:
            return out, feature
        if self.mode == TRACE:
            return out, trace  # trace[j]: the input of up block j
        return out


ADAPTER = UNetAdapter("unet", "UNet2DModel")
