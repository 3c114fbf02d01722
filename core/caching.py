"""Feature caching across denoising steps: the graph variants a cache schedule runs.

DiT (FORA / Δ-DiT / TeaCache style): blocks [first, stop) are replaced, at a cached step, by the
residual they added at the last refresh step. UNet (DeepCache): levels [first, n) -- the down block,
everything deeper and the matching up block -- are replaced by the feature they fed to the up path.

Each family's forward is re-stated here with the cut points exposed, so the variants export to ONNX
as plain graphs; `tests/test_caching.py` checks the full variant against the diffusers forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.ir import CACHED, FULL, DiffusionProgram

CACHE = "cache"  # name of the carried tensor (ONNX input/output and plan.json)
TRACE = "trace"  # every cut point's activation, for the cache search
MODES = (FULL, CACHED, TRACE)


def levels(program: DiffusionProgram) -> int:
    """How many levels a cache region can span: DiT blocks, UNet down blocks."""
    model = program.denoiser
    if program.spec.family == "dit":
        return len(model.transformer_blocks)
    if program.spec.family == "unet":
        return len(model.down_blocks)
    raise ConfigError(f"feature caching does not support the '{program.spec.family}' family")


def check_region(program: DiffusionProgram, region: tuple[int, int]) -> None:
    first, stop = region
    n = levels(program)
    if not 0 <= first < stop <= n:
        raise ConfigError(f"cache region {region} is outside the model's {n} levels")
    if program.spec.family == "unet":
        if first < 1 or stop != n:
            raise ConfigError(f"a UNet cache region is (first, {n}) with first >= 1 (levels recomputed), got {region}")
        if any(hasattr(b, "skip_conv") for b in (*program.denoiser.down_blocks, *program.denoiser.up_blocks)):
            raise ConfigError("UNet skip-connection block types (skip_conv) are not supported by feature caching")


class DiTSteps(nn.Module):
    """DiTTransformer2DModel forward with blocks [first, stop) cacheable."""

    def __init__(self, model: nn.Module, region: tuple[int, int], mode: str) -> None:
        super().__init__()
        self.model, self.region, self.mode = model, region, mode

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, cache=None):
        m, (first, stop) = self.model, self.region
        channels = sample.shape[1]
        h = m.pos_embed(sample)
        trace, entry = [h], h
        for k, block in enumerate(m.transformer_blocks):
            if k == first:
                entry = h
                if self.mode == CACHED:
                    h = h + cache
            if self.mode == CACHED and first <= k < stop:
                continue
            h = block(h, None, None, None, timestep, None, class_labels)
            trace.append(h)
            if k == stop - 1:
                residual = h - entry
        out = self._head(h, timestep, class_labels)
        out = out[:, :channels] if out.shape[1] == 2 * channels else out
        if self.mode == FULL:
            return out, residual
        if self.mode == TRACE:
            return out, trace
        return out

    def _head(self, h: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        m, p = self.model, self.model.patch_size
        conditioning = m.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
        shift, scale = m.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        h = m.proj_out_2(m.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
        side = int(h.shape[1] ** 0.5)
        h = h.reshape(-1, side, side, p, p, m.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, m.out_channels, side * p, side * p)


class UNetSteps(nn.Module):
    """UNet2DModel forward with levels [first, n) cacheable (DeepCache)."""

    def __init__(self, model: nn.Module, region: tuple[int, int], mode: str) -> None:
        super().__init__()
        self.model, self.region, self.mode = model, region, mode

    def _embedding(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels) -> torch.Tensor:
        m = self.model
        timesteps = timestep * torch.ones(sample.shape[0], dtype=timestep.dtype)
        emb = m.time_embedding(m.time_proj(timesteps).to(dtype=m.dtype))
        if m.class_embedding is not None:
            labels = m.time_proj(class_labels) if m.config.class_embed_type == "timestep" else class_labels
            emb = emb + m.class_embedding(labels).to(dtype=m.dtype)
        return emb

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels=None, cache=None):
        m, (first, _) = self.model, self.region
        n = len(m.down_blocks)
        emb = self._embedding(sample, timestep, class_labels)
        h = m.conv_in(sample)
        res: tuple[torch.Tensor, ...] = (h,)
        for k, block in enumerate(m.down_blocks):
            if self.mode == CACHED and k >= first:
                break
            h, block_res = block(hidden_states=h, temb=emb)
            res += block_res
        trace = []
        if self.mode == CACHED:
            # Keep only the skip tensors the recomputed up blocks consume (the deepest ones went to cached levels).
            res = res[: sum(len(b.resnets) for b in m.up_blocks[n - first :])]
            h = cache
        elif m.mid_block is not None:
            h = m.mid_block(h, emb)
        for j, block in enumerate(m.up_blocks):
            if self.mode == CACHED and j < n - first:
                continue
            trace.append(h)
            if j == n - first:
                feature = h
            block_res, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
            h = block(h, block_res, emb)
        out = m.conv_out(m.conv_act(m.conv_norm_out(h)))
        if m.config.time_embedding_type == "fourier":
            out = out / timestep.reshape(-1, 1, 1, 1)
        if self.mode == FULL:
            return out, feature
        if self.mode == TRACE:
            return out, trace  # trace[j]: the input of up block j
        return out


def steps_module(program: DiffusionProgram, mode: str, region: tuple[int, int] | None = None) -> nn.Module:
    """The network of `program` as the `mode` variant for `region` (default: the plan's cache region)."""
    if mode not in MODES:
        raise ValueError(f"unknown variant mode {mode!r}")
    if region is None:
        if program.plan.cache is None:
            raise ConfigError("the program has no cache schedule")
        region = program.plan.cache.region
    check_region(program, region)
    cls = DiTSteps if program.spec.family == "dit" else UNetSteps
    return cls(program.denoiser, tuple(region), mode).eval()


def trace(program: DiffusionProgram, x: torch.Tensor, t: torch.Tensor, y) -> list[torch.Tensor]:
    """The activations at every cut point, one full forward: DiT h_0..h_N (block inputs and the last
    output), UNet the input of every up block."""
    n = levels(program)
    module = steps_module(program, TRACE, (0, n) if program.spec.family == "dit" else (n - 1, n))
    with torch.inference_mode():
        return module(x, t, y)[1]


def region_tensors(family: str, traced: list[torch.Tensor], region: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(the tensor a refresh step stores, the region's exit activation) from a trace.

    DiT (first, stop): (h_stop - h_first, h_stop); UNet (first, n): the input of up block n - first, twice.
    A cached step's error at the region exit is |stored_then - stored_now| / |exit_now|."""
    first, stop = region
    if family == "dit":
        return traced[stop] - traced[first], traced[stop]
    feature = traced[len(traced) - first]
    return feature, feature
