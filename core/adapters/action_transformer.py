"""The transformer action denoiser (core.networks.action_transformer): adaLN-Zero blocks over the action
chunk's tokens, conditioned on the diffusion step and the observation history. Its blocks are a stack of
identical blocks, so layer removal and block-range caching (BAC) run on it through the generic variants."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from torch import nn

from core.adapters.base import BLOCK_RANGE, HEADS, MLP
from core.adapters.policy import POLICY_CAPS, PolicyAdapter
from core.surgery import MlpSite


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
    prunable: ClassVar[tuple[str, ...]] = (HEADS, MLP)

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))), ("time_embed",)

    def prunable_units(self, model: nn.Module) -> Iterator[tuple[str, str, Any]]:
        """Each block's self-attention heads and MLP units (ff: Linear, GELU, Linear)."""
        for i, block in enumerate(model.transformer_blocks):
            if HEADS in self.prunable:
                yield f"transformer_blocks.{i}.attn", HEADS, block.attn
            if MLP in self.prunable:
                yield f"transformer_blocks.{i}.ff", MLP, MlpSite(block.ff[0], block.ff[2])


ADAPTER = ActionTransformerAdapter("action-transformer", "ActionTransformer")
