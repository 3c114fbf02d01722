"""LeRobot's diffusion policy (`type: diffusion`): the conditional 1-D UNet over an action chunk
(core.networks.lerobot_unet), conditioned on the observation history (state, environment state), with the
policy's normalization as the observation and output stages. Loaded from LeRobot's `save_pretrained`
folders by core.lerobot_folder."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, ClassVar

from torch import nn

from core.adapters.base import CHANNELS
from core.adapters.policy import POLICY_CAPS, PolicyAdapter
from core.surgery import ChannelSite


class LeRobotDiffusionAdapter(PolicyAdapter):
    CAPS: ClassVar[dict[str, int]] = {
        **POLICY_CAPS,
        "kernel_size": 31,
        "n_groups": 1024,
        "diffusion_step_embed_dim": 8192,
    }
    network: ClassVar[str] = "lerobot_unet"
    block_layout: ClassVar[str] = "channels"
    quantizable: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv1d)
    prunable: ClassVar[tuple[str, ...]] = (CHANNELS,)

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Blocks: the residual blocks in execution order (two per level, two in the middle)."""
        blocks = [f"down_modules.{i}.{j}" for i in range(len(model.down_modules)) for j in (0, 1)]
        blocks += [f"mid_modules.{i}" for i in range(len(model.mid_modules))]
        blocks += [f"up_modules.{i}.{j}" for i in range(len(model.up_modules)) for j in (0, 1)]
        return tuple(blocks), ("diffusion_step_encoder",)

    def prunable_units(self, model: nn.Module) -> Iterator[tuple[str, str, Any]]:
        """Each residual block's inner channels: the first Conv1dBlock's conv and GroupNorm, the FiLM rows
        (scale and bias), the second block's conv; the block splits FiLM by its new width."""
        for name in self.describe(model)[0]:
            block = model.get_submodule(name)
            site = ChannelSite(
                block.conv1.block[0],
                block.conv1.block[1],
                block.conv2.block[0],
                block.cond_encoder[1],
                2 if block.film_scale else 1,
                functools.partial(setattr, block, "out_channels"),
            )
            yield name, CHANNELS, site


ADAPTER = LeRobotDiffusionAdapter("lerobot-diffusion", "LeRobotDiffusionUnet")
