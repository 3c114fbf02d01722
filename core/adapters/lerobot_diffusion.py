"""LeRobot's diffusion policy (`type: diffusion`): the conditional 1-D UNet over an action chunk
(core.networks.lerobot_unet), conditioned on the observation history (state, environment state), with the
policy's normalization as the observation and output stages. Loaded from LeRobot's `save_pretrained`
folders by core.lerobot_folder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import Adapter
from core.errors import LoadError
from core.ir import Chunking, Conditioning, ConditionInput, Normalization

ACTION = "action"


class LeRobotDiffusionAdapter(Adapter):
    CAPS: ClassVar[dict[str, int]] = {
        "horizon": 4096,
        "action_dim": 256,
        "n_obs_steps": 64,
        "n_action_steps": 4096,
        "kernel_size": 31,
        "n_groups": 1024,
        "diffusion_step_embed_dim": 8192,
    }
    block_layout: ClassVar[str] = "channels"
    quantizable: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv1d)

    def build(self, config: dict[str, Any]) -> nn.Module:
        from core.networks.lerobot_unet import LeRobotDiffusionUnet

        try:
            return LeRobotDiffusionUnet.from_config(config)
        except Exception as exc:  # a bad config fails in many ways inside torch
            raise LoadError(f"invalid LeRobot diffusion config: {exc}") from exc

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        # LeRobot's _prepare_global_conditioning: the features of each observed step side by side, flattened.
        names = [name for name, _ in model.config.observations]
        return model(x, t, torch.cat([cond[n] for n in names], dim=-1).flatten(1))

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        steps = config["n_obs_steps"]
        return {name: torch.zeros(1, steps, dim, device=device) for name, dim in config["observations"]}

    def conditioning(self, model: nn.Module) -> Conditioning:
        c = model.config
        return Conditioning(
            observation=tuple(
                ConditionInput(name, (c.n_obs_steps, dim), "float32", _normalization(c, name))
                for name, dim in c.observations
            )
        )

    def label_rows(self, model: nn.Module) -> int:
        return 0

    def sample_shape(self, config: dict[str, Any]) -> tuple[int, ...]:
        return (config["horizon"], config["action_dim"])

    def sample_axes(self, config: dict[str, Any]) -> tuple[str, ...]:
        return ("horizon", "action_dim")

    def output_normalization(self, model: nn.Module) -> Normalization | None:
        return _normalization(model.config, ACTION)

    def chunking(self, model: nn.Module) -> Chunking | None:
        return Chunking(model.config.n_obs_steps, model.config.n_action_steps)

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Blocks: the residual blocks in execution order (two per level, two in the middle)."""
        blocks = [f"down_modules.{i}.{j}" for i in range(len(model.down_modules)) for j in (0, 1)]
        blocks += [f"mid_modules.{i}" for i in range(len(model.mid_modules))]
        blocks += [f"up_modules.{i}.{j}" for i in range(len(model.up_modules)) for j in (0, 1)]
        return tuple(blocks), ("diffusion_step_encoder",)


def _normalization(config: Any, name: str) -> Normalization | None:
    stats = (config.normalization or {}).get(name)
    return None if stats is None else Normalization(tuple(stats[0]), tuple(stats[1]))


ADAPTER = LeRobotDiffusionAdapter("lerobot-diffusion", "LeRobotDiffusionUnet")
