"""LeRobot's diffusion-policy denoiser, `DiffusionConditionalUnet1d` (Chi et al. 2023, "Diffusion Policy"):
a 1-D convolutional UNet over the action chunk's time axis, FiLM-conditioned on the diffusion step and the
flattened observation history. Restated here because lerobot cannot be imported beside our torch (it pins
torch < 2.12, and its torchvision import fails on the CPU build); the module tree and parameter names are
LeRobot's own (`diffusion.unet.` stripped), so its checkpoints load unchanged, and
tests/policies/test_lerobot_equivalence.py compares outputs with LeRobot's in a side environment.

The config also carries what the policy's processors hold (observation and action normalization) and its
chunking (`n_obs_steps`, `n_action_steps`), so a program is self-contained."""

from __future__ import annotations

import functools
import itertools
import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, device=x.device) * -(math.log(10000) / (half - 1)))
        emb = x.float().unsqueeze(-1) * freq.unsqueeze(0)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, inp: int, out: int, kernel_size: int, n_groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(inp, out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(n_groups, out), nn.Mish()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResidualBlock1d(nn.Module):
    """Two Conv1dBlocks with FiLM between them (scale and bias, or bias only) and a residual path."""

    def __init__(self, inp: int, out: int, cond_dim: int, kernel_size: int, n_groups: int, film_scale: bool) -> None:
        super().__init__()
        self.film_scale, self.out_channels = film_scale, out
        self.conv1 = Conv1dBlock(inp, out, kernel_size, n_groups)
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out if film_scale else out))
        self.conv2 = Conv1dBlock(out, out, kernel_size, n_groups)
        self.residual_conv = nn.Conv1d(inp, out, 1) if inp != out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        film = self.cond_encoder(cond).unsqueeze(-1)
        h = film[:, : self.out_channels] * h + film[:, self.out_channels :] if self.film_scale else h + film
        return self.conv2(h) + self.residual_conv(x)


class LeRobotDiffusionUnet(ModelMixin, ConfigMixin):
    """(sample [B, horizon, action_dim], timestep [B], global_cond [B, n_obs_steps * obs_dim]) -> [B, horizon,
    action_dim]. `observations`: [name, dim] in the order LeRobot concatenates them (state, images' features,
    environment state); `normalization`: name -> [center, spread] per feature (MIN_MAX and MEAN_STD alike,
    x_normalized = (x - center) / spread), `action` included."""

    @register_to_config
    def __init__(
        self,
        horizon: int = 16,
        action_dim: int = 2,
        observations: tuple = (("observation.state", 2),),
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        down_dims: tuple = (512, 1024, 2048),
        kernel_size: int = 5,
        n_groups: int = 8,
        diffusion_step_embed_dim: int = 128,
        use_film_scale_modulation: bool = True,
        normalization: dict | None = None,
    ) -> None:
        super().__init__()
        step = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(step), nn.Linear(step, 4 * step), nn.Mish(), nn.Linear(4 * step, step)
        )
        cond_dim = step + n_obs_steps * sum(int(dim) for _, dim in observations)
        res = functools.partial(
            ResidualBlock1d,
            cond_dim=cond_dim,
            kernel_size=kernel_size,
            n_groups=n_groups,
            film_scale=use_film_scale_modulation,
        )
        dims = list(down_dims)
        in_out = [(action_dim, dims[0]), *itertools.pairwise(dims)]
        self.down_modules = nn.ModuleList(
            nn.ModuleList(
                [
                    res(a, b),
                    res(b, b),
                    nn.Conv1d(b, b, 3, 2, 1) if i < len(in_out) - 1 else nn.Identity(),
                ]
            )
            for i, (a, b) in enumerate(in_out)
        )
        self.mid_modules = nn.ModuleList([res(dims[-1], dims[-1]) for _ in range(2)])
        # Every up level upsamples (LeRobot's `is_last` test never holds there): as many as the downsamples.
        self.up_modules = nn.ModuleList(
            nn.ModuleList([res(2 * b, a), res(a, a), nn.ConvTranspose1d(a, a, 4, 2, 1)])
            for a, b in reversed(in_out[1:])
        )
        # LeRobot's final block keeps GroupNorm's default 8 groups whatever n_groups says.
        self.final_conv = nn.Sequential(Conv1dBlock(dims[0], dims[0], kernel_size), nn.Conv1d(dims[0], action_dim, 1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        x = sample.transpose(1, 2)
        cond = torch.cat([self.diffusion_step_encoder(timestep).to(x.dtype), global_cond], dim=-1)
        skips = []
        for first, second, down in self.down_modules:
            x = second(first(x, cond), cond)
            skips.append(x)
            x = down(x)
        for mid in self.mid_modules:
            x = mid(x, cond)
        for first, second, up in self.up_modules:
            x = up(second(first(torch.cat((x, skips.pop()), dim=1), cond), cond))
        return self.final_conv(x).transpose(1, 2)
