"""Stable Diffusion 3 / 3.5 (diffusers `SD3Transformer2DModel`): an MMDiT whose blocks attend jointly
over image and text tokens (Esser et al. 2024), conditioned on two CLIP encoders and T5; sampled by flow
matching (FlowMatchEulerDiscreteScheduler, velocity prediction)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from core.adapters.text import TextAdapter, flow_shift
from core.errors import LoadError
from core.ir import SamplingPlan, Stages
from core.schedulers import full_config


class Sd3Prompts(nn.Module):
    """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states side by side,
    zero-padded to T5's width and followed by T5's tokens (zeros when the pipeline has no T5); the
    pooled embedding is both CLIPs' projected ones side by side."""

    def __init__(self, clip: nn.Module, clip_2: nn.Module, t5: nn.Module | None, t5_tokens: int, width: int) -> None:
        super().__init__()
        self.clip, self.clip_2, self.t5 = clip, clip_2, t5
        self.t5_tokens, self.width = t5_tokens, width

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor, *t5_ids: torch.Tensor):
        a = self.clip(input_ids, output_hidden_states=True)
        b = self.clip_2(input_ids_2, output_hidden_states=True)
        clip = torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1)
        t5 = clip.new_zeros(clip.shape[0], self.t5_tokens, self.width) if self.t5 is None else self.t5(t5_ids[0])[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([a[0], b[0]], dim=-1)


class SD3Adapter(TextAdapter):
    CAPS: ClassVar[dict[str, int]] = {
        "sample_size": 4096,
        "patch_size": 64,
        "in_channels": 4096,
        "out_channels": 4096,
        "num_layers": 1024,
        "attention_head_dim": 4096,
        "num_attention_heads": 1024,
        "joint_attention_dim": 65536,
        "caption_projection_dim": 65536,
        "pooled_projection_dim": 65536,
        "pos_embed_max_size": 4096,
    }
    T5_TOKENS: ClassVar[int] = 256  # StableDiffusion3Pipeline's max_sequence_length

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        return model(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            timestep=t,
            return_dict=False,
        )[0]

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        width, pooled = config.get("joint_attention_dim", 4096), config.get("pooled_projection_dim", 2048)
        return {
            "encoder_hidden_states": torch.zeros(1, self.MAX_TOKENS + self.T5_TOKENS, width, device=device),
            "pooled_projections": torch.zeros(1, pooled, device=device),
        }

    def lengths(self, stages: Stages) -> tuple[int, ...]:
        clip = tuple(min(int(t.model_max_length), self.MAX_TOKENS) for t in stages.tokenizers[:2])
        return clip + (self.T5_TOKENS,) * len(stages.tokenizers[2:])

    def condition_names(self, stages: Stages) -> tuple[str, ...]:
        return ("encoder_hidden_states", "pooled_projections")

    def prompt_encoder(self, stages: Stages, config: Mapping[str, Any]) -> nn.Module:
        encoders = stages.text_encoders
        if len(encoders) < 2:
            raise LoadError(f"{self.model_class} takes two CLIP text encoders (and optionally T5); got {len(encoders)}")
        t5 = encoders[2] if len(encoders) > 2 else None
        width = int(config.get("joint_attention_dim", 4096))
        return Sd3Prompts(encoders[0], encoders[1], t5, self.T5_TOKENS, width)

    def timestep_plan(self, config: dict[str, Any], plan: SamplingPlan) -> SamplingPlan:
        scheduler = full_config(plan)
        if not scheduler.get("use_dynamic_shifting"):
            return plan
        _channels, h, w = self.sample_shape(config)
        patch = int(config.get("patch_size", 2))
        return dataclasses.replace(plan, mu=flow_shift((h // patch) * (w // patch), scheduler))

    def block_stream(self, output: Any) -> torch.Tensor:
        """Joint blocks return (text stream, image stream); single blocks the image stream."""
        return output[-1] if isinstance(output, tuple) else output

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        blocks = tuple(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks)))
        return blocks, ("time_text_embed",)


ADAPTER = SD3Adapter("sd3", "SD3Transformer2DModel")
