"""FLUX.1 (diffusers `FluxTransformer2DModel`): double-stream (MMDiT) then single-stream blocks over
2x2-packed latent tokens with 3-axis RoPE ids, conditioned on T5 tokens and a pooled CLIP embedding;
sampled by flow matching with linear sigmas and a resolution-dependent shift. FLUX.1-dev embeds the
guidance scale (guidance distillation) instead of running classifier-free guidance.

The loop sees unpacked latents [B, C, H, W]: packing, the position ids and the timestep's /1000 happen
inside `forward`, so caching, verification and the lowered graphs treat Flux like any latent model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import GUIDANCE
from core.adapters.text import TextAdapter, flow_shift
from core.errors import LoadError
from core.ir import SamplingPlan, Stages
from core.schedulers import full_config
from core.validate import is_int


class FluxPrompts(nn.Module):
    """As FluxPipeline.encode_prompt: T5's last hidden state, and CLIP's pooled output."""

    def __init__(self, clip: nn.Module, t5: nn.Module) -> None:
        super().__init__()
        self.clip, self.t5 = clip, t5

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor):
        pooled = self.clip(input_ids, output_hidden_states=False).pooler_output
        return self.t5(input_ids_2, output_hidden_states=False)[0], pooled


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """[(h/2) * (w/2), 3] position ids (0, row, column): FluxPipeline._prepare_latent_image_ids."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


class FluxAdapter(TextAdapter):
    CAPS: ClassVar[dict[str, int]] = {
        "sample_size": 4096,
        "patch_size": 64,
        "in_channels": 4096,
        "out_channels": 4096,
        "num_layers": 1024,
        "num_single_layers": 1024,
        "attention_head_dim": 4096,
        "num_attention_heads": 1024,
        "joint_attention_dim": 65536,
        "pooled_projection_dim": 65536,
    }
    T5_TOKENS: ClassVar[int] = 512  # FluxPipeline's max_sequence_length
    # FluxPipeline's default: 1024 px, i.e. 128 latent rows. Flux configs carry no sample size; a
    # `sample_size` key in the transformer's config.json sets another one.
    SAMPLE_SIZE: ClassVar[int] = 128
    EMBEDDED_GUIDANCE: ClassVar[float] = 3.5  # FluxPipeline's default guidance_scale (FLUX.1-dev)

    def sample_shape(self, config: dict[str, Any]) -> tuple[int, int, int]:
        size, channels = config.get("sample_size", self.SAMPLE_SIZE), config.get("in_channels", 64)
        if not (is_int(size) and is_int(channels) and size > 0 and size % 2 == 0 and channels % 4 == 0):
            raise LoadError(
                f"{self.model_class} config: in_channels must be a multiple of 4 (2x2-packed latents) and "
                f"sample_size an even positive integer, got {channels!r} and {size!r}"
            )
        return (channels // 4, size, size)

    def embeds_guidance(self, config: Mapping[str, Any]) -> bool:
        return bool(config.get("guidance_embeds"))

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        h, w = x.shape[-2:]
        text = cond["encoder_hidden_states"]
        guidance = None
        if model.config.guidance_embeds:  # the program's embedded guidance (Denoiser), else FluxPipeline's default
            guidance = cond.get(GUIDANCE, torch.full_like(t, self.EMBEDDED_GUIDANCE))
        out = model(
            pack(x),
            encoder_hidden_states=text,
            pooled_projections=cond["pooled_projections"],
            timestep=t / 1000,
            img_ids=image_ids(h, w).to(x),
            txt_ids=text.new_zeros(text.shape[1], 3),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        width, pooled = config.get("joint_attention_dim", 4096), config.get("pooled_projection_dim", 768)
        return {
            "encoder_hidden_states": torch.zeros(1, self.T5_TOKENS, width, device=device),
            "pooled_projections": torch.zeros(1, pooled, device=device),
        }

    def lengths(self, stages: Stages) -> tuple[int, ...]:
        return (min(int(stages.tokenizers[0].model_max_length), self.MAX_TOKENS), self.T5_TOKENS)

    def condition_names(self, stages: Stages) -> tuple[str, ...]:
        return ("encoder_hidden_states", "pooled_projections")

    def prompt_encoder(self, stages: Stages, config: Mapping[str, Any]) -> nn.Module:
        if len(stages.text_encoders) != 2:
            raise LoadError(f"{self.model_class} takes a CLIP and a T5 text encoder; got {len(stages.text_encoders)}")
        return FluxPrompts(*stages.text_encoders)

    def timestep_plan(self, config: dict[str, Any], plan: SamplingPlan) -> SamplingPlan:
        _, h, w = self.sample_shape(config)
        mu = flow_shift((h // 2) * (w // 2), full_config(plan))
        return dataclasses.replace(plan, mu=mu, linear_sigmas=True)

    def block_stream(self, output: Any) -> torch.Tensor:
        """Joint blocks return (text stream, image stream); single blocks the image stream."""
        return output[-1] if isinstance(output, tuple) else output

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        double = (f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks)))
        single = (f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks)))
        return (*double, *single), ("time_text_embed",)


ADAPTER = FluxAdapter("flux", "FluxTransformer2DModel")
