"""What the action-denoiser families share (core.networks: LeRobot's 1-D UNet, the action transformer): a
sample is an action chunk [horizon, action_dim], the conditions are the observation history (one tensor per
observed feature, [n_obs_steps, dim], flattened side by side as LeRobot's _prepare_global_conditioning does),
and the config carries the policy's normalization and chunking."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import Adapter
from core.errors import LoadError
from core.ir import Chunking, Conditioning, ConditionInput, Normalization

ACTION = "action"
# Caps shared by every policy config (the families add their own).
POLICY_CAPS: dict[str, int] = {"horizon": 4096, "action_dim": 256, "n_obs_steps": 64, "n_action_steps": 4096}


class PolicyAdapter(Adapter):
    network: ClassVar[str]  # the core.networks module holding `model_class`

    def build(self, config: dict[str, Any]) -> nn.Module:
        import importlib

        cls = getattr(importlib.import_module(f"core.networks.{self.network}"), self.model_class)
        try:
            return cls.from_config(config)
        except Exception as exc:  # a bad config fails in many ways inside torch
            raise LoadError(f"invalid {self.model_class} config: {exc}") from exc

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
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


def _normalization(config: Any, name: str) -> Normalization | None:
    stats = (config.normalization or {}).get(name)
    return None if stats is None else Normalization(tuple(stats[0]), tuple(stats[1]))
