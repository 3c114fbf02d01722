"""diffusers `UNet1DModel`: a 1-D UNet over a signal's length (Janner et al. 2022's temporal UNet over
state-action trajectories, in diffusers' value-guided planning pipeline; Dance Diffusion's over audio),
unconditional. A sample is [in_channels, sample_size]; the levels change the length, so it has no stack of
identical blocks (layer removal and block caching do not apply)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import Adapter
from core.errors import LoadError
from core.ir import Conditioning
from core.validate import is_int


class UNet1DAdapter(Adapter):
    CAPS: ClassVar[dict[str, int]] = {
        "sample_size": 1 << 20,
        "in_channels": 4096,
        "out_channels": 4096,
        "block_out_channels": 65536,
        "layers_per_block": 64,
        "norm_num_groups": 4096,
        "time_embedding_dim": 65536,
    }
    block_layout: ClassVar[str] = "channels"
    quantizable: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv1d)

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        return model(x, t, return_dict=False)[0]

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        return {}

    def conditioning(self, model: nn.Module) -> Conditioning:
        return Conditioning()

    def label_rows(self, model: nn.Module) -> int:
        return 0

    def sample_shape(self, config: dict[str, Any]) -> tuple[int, ...]:
        channels: Any = config.get("in_channels")
        length: Any = config.get("sample_size")
        if not (is_int(channels) and is_int(length) and channels > 0 and length > 0):
            raise LoadError(
                f"UNet1DModel config: in_channels and sample_size must be positive integers, got {channels!r} and"
                f" {length!r}"
            )
        return (channels, length)

    def sample_axes(self, config: dict[str, Any]) -> tuple[str, ...]:
        return ("channels", "length")

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        down = (f"down_blocks.{i}" for i in range(len(model.down_blocks)))
        up = (f"up_blocks.{i}" for i in range(len(model.up_blocks)))
        temporal = tuple(n for n in ("time_proj", "time_mlp") if getattr(model, n, None) is not None)
        return (*down, "mid_block", *up), temporal


ADAPTER = UNet1DAdapter("unet1d", "UNet1DModel")
