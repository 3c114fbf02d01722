"""A toy diffusion policy, defined in this one file: it denoises an action chunk (horizon x action_dim, a
1-D sample) conditioned on an observation history (`observation.state`, n_obs_steps x state_dim), with
LeRobot's min/max normalization of states and actions (to [-1, 1]). It proves the IR's samples of any rank
and observation conditioning (issue 34); the real policy families are issue 35's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from core.adapters.base import Adapter
from core.errors import LoadError
from core.ir import Conditioning, ConditionInput, Normalization

STATE = "observation.state"  # LeRobot's name: not a Python identifier, only a tensor name


def min_max(low: list[float], high: list[float]) -> Normalization:
    """LeRobot's MIN_MAX mode, (x - min) / (max - min) * 2 - 1, as a center and a spread."""
    return Normalization(
        tuple((h + lo) / 2 for lo, h in zip(low, high, strict=True)),
        tuple((h - lo) / 2 for lo, h in zip(low, high, strict=True)),
    )


class ChunkNet(ModelMixin, ConfigMixin):
    """Conv1d over the chunk's time axis, FiLM-modulated by the timestep and the flattened observation
    history (Chi et al.'s Diffusion Policy, in miniature)."""

    @register_to_config
    def __init__(
        self,
        horizon: int = 8,
        action_dim: int = 2,
        state_dim: int = 3,
        n_obs_steps: int = 2,
        width: int = 32,
        state_min: tuple[float, ...] = (0.0, 0.0, -3.2),
        state_max: tuple[float, ...] = (512.0, 512.0, 3.2),
        action_min: tuple[float, ...] = (0.0, 0.0),
        action_max: tuple[float, ...] = (512.0, 512.0),
    ) -> None:
        super().__init__()
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, width)
        self.observation = nn.Linear(n_obs_steps * state_dim, width)
        self.film = nn.Linear(width, 2 * width)
        self.conv_in = nn.Conv1d(action_dim, width, 3, padding=1)
        self.conv_mid = nn.Conv1d(width, width, 3, padding=1)
        self.conv_out = nn.Conv1d(width, action_dim, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype)) + self.observation(state.flatten(1))
        scale, shift = self.film(nn.functional.silu(emb)).chunk(2, dim=1)
        h = self.conv_in(sample.transpose(1, 2))
        h = nn.functional.mish(h * (1 + scale[..., None]) + shift[..., None])
        h = nn.functional.mish(self.conv_mid(h))
        return self.conv_out(h).transpose(1, 2)


class ChunkNetAdapter(Adapter):
    CAPS: ClassVar[dict[str, int]] = {"horizon": 1024, "action_dim": 64, "state_dim": 256, "width": 1024}
    quantizable: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv1d)

    def build(self, config: dict[str, Any]) -> nn.Module:
        try:
            return ChunkNet.from_config(config)
        except Exception as exc:
            raise LoadError(f"invalid ChunkNet config: {exc}") from exc

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        return model(x, t, cond[STATE])

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        return {STATE: torch.zeros(1, config["n_obs_steps"], config["state_dim"], device=device)}

    def conditioning(self, model: nn.Module) -> Conditioning:
        c = model.config
        state = ConditionInput(STATE, (c.n_obs_steps, c.state_dim), "float32", min_max(c.state_min, c.state_max))
        return Conditioning(observation=(state,))

    def label_rows(self, model: nn.Module) -> int:
        return 0

    def sample_shape(self, config: dict[str, Any]) -> tuple[int, ...]:
        return (config["horizon"], config["action_dim"])

    def sample_axes(self, config: dict[str, Any]) -> tuple[str, ...]:
        return ("horizon", "action_dim")

    def output_normalization(self, model: nn.Module) -> Normalization | None:
        return min_max(model.config.action_min, model.config.action_max)

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (), ("time_proj", "time_embedding")


ADAPTER = ChunkNetAdapter("toy-policy", "ChunkNet")
