"""The transformer action denoiser (core.networks.action_transformer): adaLN-Zero blocks over the action
chunk's tokens, conditioned on the diffusion step and the observation history. Its blocks are a stack of
identical blocks, so layer removal and block-range caching (BAC) run on it through the generic variants."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from core.adapters.base import BLOCK_RANGE
from core.adapters.policy import POLICY_CAPS, PolicyAdapter


class ActionTransformerAdapter(PolicyAdapter):
    CAPS: ClassVar[dict[str, int]] = {
        **POLICY_CAPS,
        "num_layers": 1024,
        "num_attention_heads": 1024,
        "attention_head_dim": 4096,
        "mlp_ratio": 64,
        "diffusion_step_embed_dim": 8192,
    }
    network: ClassVar[str] = "action_transformer"
    block_stack: ClassVar[str | None] = "transformer_blocks"
    depth_field: ClassVar[str | None] = "num_layers"
    self_attention: ClassVar[str] = "attn"
    cache_cut: ClassVar[str | None] = BLOCK_RANGE
    quantizable: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))), ("time_embed",)


ADAPTER = ActionTransformerAdapter("action-transformer", "ActionTransformer")
