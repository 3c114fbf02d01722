"""PixArt-α/Σ (diffusers `PixArtTransformer2DModel`): a DiT whose blocks cross-attend to T5 (or any
encoder's) prompt embeddings, with the tokenizer's attention mask; timestep through adaLN-single."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import BLOCK_RANGE, CROSS_HEADS, HEADS, MLP
from core.adapters.text import TextAdapter
from core.ir import Stages


class MaskedPrompts(nn.Module):
    """The encoder's last hidden state with the attention mask, which the denoiser's cross-attention
    also takes (padding tokens masked out)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.encoder(input_ids, attention_mask=attention_mask)[0]
        return hidden, attention_mask.to(hidden.dtype)


class PixArtAdapter(TextAdapter):
    CAPS: ClassVar[dict[str, int]] = {
        "num_layers": 1024,
        "num_attention_heads": 1024,
        "attention_head_dim": 4096,
        "sample_size": 4096,
        "patch_size": 64,
        "in_channels": 4096,
        "out_channels": 4096,
        "cross_attention_dim": 65536,
        "caption_channels": 65536,
    }
    block_stack: ClassVar[str | None] = "transformer_blocks"
    depth_field: ClassVar[str | None] = "num_layers"
    cache_cut: ClassVar[str | None] = BLOCK_RANGE
    prunable: ClassVar[tuple[str, ...]] = (HEADS, CROSS_HEADS, MLP)
    MAX_TOKENS: ClassVar[int] = 120  # PixArtAlphaPipeline's max_sequence_length
    PIXELS_PER_LATENT: ClassVar[int] = 8  # the size conditioning of use_additional_conditions models

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            h, w = x.shape[-2] * self.PIXELS_PER_LATENT, x.shape[-1] * self.PIXELS_PER_LATENT
            added = {
                "resolution": torch.tensor([[h, w]], dtype=x.dtype).expand(x.shape[0], -1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype).expand(x.shape[0], -1),
            }
        out = model(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=t,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        channels = x.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out  # learned sigma: eps only

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        width = config.get("caption_channels") or 4096
        return {
            "encoder_hidden_states": torch.zeros(1, self.MAX_TOKENS, width, device=device),
            "encoder_attention_mask": torch.ones(1, self.MAX_TOKENS, device=device),
        }

    def uses_mask(self, index: int) -> bool:
        return True

    def condition_names(self, stages: Stages) -> tuple[str, ...]:
        return ("encoder_hidden_states", "encoder_attention_mask")

    def prompt_encoder(self, stages: Stages, config: Mapping[str, Any]) -> nn.Module:
        return MaskedPrompts(stages.text_encoders[0])

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        blocks = tuple(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks)))
        return blocks, ("adaln_single",)


ADAPTER = PixArtAdapter("pixart", "PixArtTransformer2DModel")
