"""LeRobot's diffusion policy (`type: diffusion`): the conditional 1-D UNet over an action chunk
(core.networks.lerobot_unet), conditioned on the observation history (state, environment state), with the
policy's normalization as the observation and output stages. Loaded from LeRobot's `save_pretrained`
folders by core.lerobot_folder."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from core.adapters.policy import POLICY_CAPS, PolicyAdapter


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

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Blocks: the residual blocks in execution order (two per level, two in the middle)."""
        blocks = [f"down_modules.{i}.{j}" for i in range(len(model.down_modules)) for j in (0, 1)]
        blocks += [f"mid_modules.{i}" for i in range(len(model.mid_modules))]
        blocks += [f"up_modules.{i}.{j}" for i in range(len(model.up_modules)) for j in (0, 1)]
        return tuple(blocks), ("diffusion_step_encoder",)


ADAPTER = LeRobotDiffusionAdapter("lerobot-diffusion", "LeRobotDiffusionUnet")
