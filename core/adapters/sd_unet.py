"""SD-style UNets (diffusers `UNet2DConditionModel`: SD 1.x/2.x, SDXL): cross-attention to CLIP
prompt embeddings; SDXL also takes the pooled embedding and size/crop ids (`addition_embed_type`
"text_time"), with two text encoders whose penultimate hidden states are concatenated."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import CHANNELS, CROSS_HEADS, GUIDANCE, HEADS, MLP, UNET_LEVELS
from core.adapters.text import TextAdapter
from core.ir import Stages


class ClipPrompts(nn.Module):
    """SD 1.x/2.x: the last hidden state of one CLIP text encoder."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(input_ids)[0],)


class SdxlPrompts(nn.Module):
    """SDXL: both encoders' penultimate hidden states, concatenated; the second encoder's projected
    pooled embedding; the (original size, crop, target size) ids of the sample size."""

    def __init__(self, first: nn.Module, second: nn.Module, time_ids: torch.Tensor) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.register_buffer("size_ids", time_ids, persistent=False)  # the graph output is "time_ids"

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor):
        a = self.first(input_ids, output_hidden_states=True)
        b = self.second(input_ids_2, output_hidden_states=True)
        hidden = torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1)
        return hidden, b[0], self.size_ids.expand(input_ids.shape[0], -1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] guidance values -> [B, dim]: the sinusoidal embedding of 1000 w (half sines, half cosines, log-spaced
    frequencies from 1 to 1/10000; a zero column when dim is odd), as LCM's w-conditioning feeds the UNet."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def _is_sdxl(config: Mapping[str, Any]) -> bool:
    return config.get("addition_embed_type") == "text_time"


class SDUNetAdapter(TextAdapter):
    CAPS: ClassVar[dict[str, int]] = {
        "sample_size": 4096,
        "in_channels": 4096,
        "out_channels": 4096,
        "block_out_channels": 65536,
        "layers_per_block": 64,
        "attention_head_dim": 4096,
        "num_attention_heads": 4096,
        "cross_attention_dim": 65536,
        "transformer_layers_per_block": 64,
        "norm_num_groups": 4096,
        "addition_time_embed_dim": 65536,
        "projection_class_embeddings_input_dim": 1 << 20,
    }
    VAE_SCALE: ClassVar[int] = 8  # every SD/SDXL VAE; our own pipelines pass theirs via the stages
    block_layout: ClassVar[str] = "channels"
    cache_cut: ClassVar[str | None] = UNET_LEVELS
    prunable: ClassVar[tuple[str, ...]] = (HEADS, CROSS_HEADS, MLP, CHANNELS)

    # LatentConsistencyModelPipeline's default guidance_scale, for a call without the program's own value
    # (core.caching's shells); the Denoiser passes the program's (Conditioning.embedded_guidance).
    EMBEDDED_GUIDANCE: ClassVar[float] = 8.5

    def embeds_guidance(self, config: Mapping[str, Any]) -> bool:
        return config.get("time_cond_proj_dim") is not None

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if "time_ids" in cond else None
        timestep_cond = None
        if model.config.time_cond_proj_dim is not None:  # LCM: w - 1 embedded (Luo et al. 2023, w-conditioning)
            w = cond.get(GUIDANCE, torch.full_like(t, self.EMBEDDED_GUIDANCE))
            timestep_cond = guidance_embedding(w - 1, model.config.time_cond_proj_dim)
        return model(
            x,
            t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
        )[0]

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        width = config.get("cross_attention_dim", 1280)
        width = width[0] if isinstance(width, list | tuple) else width
        cond = {"encoder_hidden_states": torch.zeros(1, self.MAX_TOKENS, width, device=device)}
        if _is_sdxl(config):
            ids = config.get("addition_time_embed_dim", 256) * 6
            pooled = config.get("projection_class_embeddings_input_dim", ids) - ids
            cond |= {"text_embeds": torch.zeros(1, pooled, device=device), "time_ids": torch.zeros(1, 6, device=device)}
        return cond

    def condition_names(self, stages: Stages) -> tuple[str, ...]:
        if len(stages.text_encoders) == 2:
            return ("encoder_hidden_states", "text_embeds", "time_ids")
        return ("encoder_hidden_states",)

    def prompt_encoder(self, stages: Stages, config: Mapping[str, Any]) -> nn.Module:
        if len(stages.text_encoders) == 1:
            return ClipPrompts(stages.text_encoders[0])
        _, h, w = self.sample_shape(dict(config))
        scale = stages.vae_scale or self.VAE_SCALE
        h, w = h * scale, w * scale
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
        return SdxlPrompts(stages.text_encoders[0], stages.text_encoders[1], time_ids)

    def zero_uncond(self, stages: Stages) -> bool:
        return len(stages.text_encoders) == 2 and bool(stages.options.get("force_zeros_for_empty_prompt", True))

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        down = (f"down_blocks.{i}" for i in range(len(model.down_blocks)))
        up = (f"up_blocks.{i}" for i in range(len(model.up_blocks)))
        blocks = (*down, "mid_block", *up)
        temporal = ("time_proj", "time_embedding")
        temporal += tuple(n for n, _ in model.named_modules() if n.endswith("time_emb_proj"))
        return blocks, temporal


ADAPTER = SDUNetAdapter("sd-unet", "UNet2DConditionModel")
