"""A transformer action denoiser (the transformer variant of Chi et al. 2023's Diffusion Policy, with DiT's
adaLN-Zero conditioning as RDT uses it): the action chunk's steps are tokens, and the diffusion step and the
flattened observation history, each embedded, are summed into one conditioning vector that scales and shifts
every block (Peebles & Xie 2023). The blocks form a stack of identical blocks, so block caching (BAC,
block-wise adaptive caching) and layer removal apply to it.

Like core.networks.lerobot_unet, the config carries the policy's normalization and chunking, so a program
is self-contained."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from core.networks.lerobot_unet import SinusoidalPosEmb


class AdaLNBlock(nn.Module):
    """Pre-norm self-attention and MLP over the chunk's tokens, each modulated (shift, scale) and gated by the
    conditioning vector; the modulation starts at zero, so a new block is the identity (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads=heads, dim_head=head_dim, bias=True, out_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = mlp_ratio * dim
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, hidden_states: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond))[:, None].chunk(6, dim=-1)
        h = hidden_states
        h = h + gate1 * self.attn(self.norm1(h) * (1 + scale1) + shift1)
        return h + gate2 * self.ff(self.norm2(h) * (1 + scale2) + shift2)


class ActionTransformer(ModelMixin, ConfigMixin):
    """(sample [B, horizon, action_dim], timestep [B], global_cond [B, n_obs_steps * obs_dim]) -> the predicted
    noise [B, horizon, action_dim]. `observations` and `normalization` as in LeRobotDiffusionUnet."""

    @register_to_config
    def __init__(
        self,
        horizon: int = 16,
        action_dim: int = 2,
        observations: tuple = (("observation.state", 2),),
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        num_layers: int = 6,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        mlp_ratio: int = 4,
        diffusion_step_embed_dim: int = 128,
        normalization: dict | None = None,
    ) -> None:
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        obs_dim = n_obs_steps * sum(int(d) for _, d in observations)
        self.action_in = nn.Linear(action_dim, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, horizon, dim) * 0.02)
        step = diffusion_step_embed_dim
        self.time_embed = nn.Sequential(SinusoidalPosEmb(step), nn.Linear(step, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.obs_embed = nn.Sequential(nn.Linear(obs_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.transformer_blocks = nn.ModuleList(
            AdaLNBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(dim, 2 * dim)
        self.action_out = nn.Linear(dim, action_dim)
        for layer in (self.out_modulation, self.action_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        cond = self.time_embed(timestep).to(sample.dtype) + self.obs_embed(global_cond)
        h = self.action_in(sample) + self.pos_embed
        for block in self.transformer_blocks:
            h = block(h, cond)
        shift, scale = self.out_modulation(F.silu(cond))[:, None].chunk(2, dim=-1)
        return self.action_out(self.norm_out(h) * (1 + scale) + shift)
