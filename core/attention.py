"""Replacements for softmax self-attention over a 2-D token grid, as diffusers attention processors that
export with standard ONNX ops (MatMul, Gather, Softmax, Relu/Elu, Conv; no custom ops).

- `LinearAttention` (Katharopoulos et al. 2020; SANA, Xie et al. 2024: ReLU kernels; LinFusion, Liu et
  al. 2024: normalized non-causal form): out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) sum_j phi(k_j)),
  linear in the token count. Optionally LiT's (Wang et al. 2025) depthwise 3x3 convolution of V over the
  token grid, added to the output; it starts at zero, so before training the layer is linear attention.
- `LocalAttention` (CLEAR, Liu et al. 2024): each query attends only to the keys within a circular window
  of radius r around it on the grid. Blocked, so the cost really falls: queries are taken in tiles of
  t x t tokens, each tile's keys gathered from its (t + 2r)^2 halo, and a static mask keeps each query's
  own circle (and drops halo positions outside the grid): N (t + 2r)^2 scores instead of N^2.

Both take the layer's own projections (to_q/k/v/out, q/k norms): weight inheritance, then distillation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError

FEATURE_MAPS = ("relu", "elu")


class GridAttention(nn.Module):
    """A self-attention processor over `grid` = (rows, cols) tokens: projections as diffusers' own
    processor does them, the token mixing in `mix`."""

    kind = "softmax"

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        # Whatever else the block passes (rotary position embeddings, a timestep embedding) this processor would
        # drop, changing the network silently: refused instead (diffusers hands a **kwargs processor everything).
        given = sorted(name for name, value in kwargs.items() if value is not None)
        if given:
            raise ConfigError(f"{type(self).__name__} does not apply {', '.join(given)}; it would drop them")
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ConfigError(f"{type(self).__name__} replaces unmasked self-attention on [batch, tokens, dim] only")
        batch, tokens, _ = hidden_states.shape
        if tokens != self.grid[0] * self.grid[1]:
            rows, cols = self.grid
            raise ConfigError(f"{tokens} tokens are not the {rows}x{cols} grid this layer was built for")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, attn.heads, head_dim).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.mix(q, k, v).transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[batch, heads, tokens, head_dim] x3 -> the same shape."""
        return F.scaled_dot_product_attention(q, k, v)


class LinearAttention(GridAttention):
    kind = "linear"

    def __init__(
        self, grid: tuple[int, int], feature_map: str = "relu", conv: bool = False, channels: int = 0, eps: float = 1e-6
    ) -> None:
        super().__init__(grid)
        if feature_map not in FEATURE_MAPS:
            raise ConfigError(f"feature map {feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
        self.feature_map, self.eps = feature_map, eps
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels) if conv else None
        if self.conv is not None:
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.feature_map == "relu" else F.elu(x) + 1.0

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fq, fk = self.phi(q), self.phi(k)
        numerator = fq @ (fk.transpose(-2, -1) @ v)  # [b, h, n, d] @ [b, h, d, d]
        denominator = fq @ fk.sum(dim=-2, keepdim=True).transpose(-2, -1)  # [b, h, n, 1]
        out = numerator / (denominator + self.eps)
        if self.conv is not None:
            b, h, n, d = v.shape
            grid = v.permute(0, 1, 3, 2).reshape(b, h * d, *self.grid)
            out = out + self.conv(grid).reshape(b, h, d, n).permute(0, 1, 3, 2)
        return out


class LocalAttention(GridAttention):
    kind = "local"

    def __init__(self, grid: tuple[int, int], radius: float, tile: int = 8) -> None:
        super().__init__(grid)
        rows, cols = self.grid
        if radius < 1:
            raise ConfigError(f"local attention radius {radius} < 1")
        self.radius = float(radius)
        self.tile, reach = local_halo(self.grid, radius, tile)
        order, keys, mask = _tiles(rows, cols, self.tile, reach, self.radius)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        self.register_buffer("keys", keys, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    @property
    def keys_per_query(self) -> int:
        return int(self.keys.shape[1])

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        tiles, halo = self.keys.shape
        flat = self.keys.reshape(-1)
        qt = q.index_select(2, self.order).reshape(b, h, tiles, n // tiles, d)
        kt = k.index_select(2, flat).reshape(b, h, tiles, halo, d)
        vt = v.index_select(2, flat).reshape(b, h, tiles, halo, d)
        scores = (qt @ kt.transpose(-2, -1)) * (d**-0.5) + self.mask
        out = torch.softmax(scores, dim=-1) @ vt
        return out.reshape(b, h, n, d).index_select(2, self.inverse)


def local_halo(grid: tuple[int, int], radius: float, tile: int) -> tuple[int, int]:
    """LocalAttention's query tile (tiles cover the grid exactly) and the halo's reach around a tile
    (the radius, but no wider than what could hold tokens): (tile + 2 reach)^2 keys per query."""
    rows, cols = grid
    tile = math.gcd(math.gcd(rows, cols), tile)
    return tile, min(math.floor(radius), max(rows, cols) - tile)


def _tiles(rows: int, cols: int, tile: int, reach: int, radius: float) -> tuple[torch.Tensor, ...]:
    """Token order by tile, each tile's halo key indices (clamped into the grid), and the additive mask
    [tiles, tile^2, halo]: 0 where the key is inside the grid and within `radius` of the query, else -inf."""
    side = tile + 2 * reach
    ti, tj = torch.meshgrid(torch.arange(rows // tile), torch.arange(cols // tile), indexing="ij")
    a, c = torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing="ij")
    qr = (ti.reshape(-1, 1) * tile + a.reshape(1, -1)).float()  # [tiles, tile^2]
    qc = (tj.reshape(-1, 1) * tile + c.reshape(1, -1)).float()
    order = (qr * cols + qc).long().reshape(-1)
    hr, hc = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    kr = ti.reshape(-1, 1) * tile - reach + hr.reshape(1, -1)  # [tiles, halo]
    kc = tj.reshape(-1, 1) * tile - reach + hc.reshape(1, -1)
    inside = (kr >= 0) & (kr < rows) & (kc >= 0) & (kc < cols)
    keys = kr.clamp(0, rows - 1) * cols + kc.clamp(0, cols - 1)
    distance = ((qr.unsqueeze(-1) - kr.unsqueeze(1)) ** 2 + (qc.unsqueeze(-1) - kc.unsqueeze(1)) ** 2).sqrt()
    keep = inside.unsqueeze(1) & (distance <= radius + 1e-6)
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    return order, keys, mask
