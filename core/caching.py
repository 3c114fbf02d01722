"""Feature caching across denoising steps: the graph variants a cache schedule runs.

DiT (FORA / Δ-DiT / TeaCache style): blocks [first, stop) are replaced, at a cached step, by the
residual they added at the last refresh step. UNet (DeepCache): levels [first, n) -- the down block,
everything deeper and the matching up block -- are replaced by the feature they fed to the up path.

DiT and UNet forwards are re-stated here with the cut points exposed, so the variants export to ONNX
as plain graphs; other transformer stacks (PixArt) run their own forward with the cached blocks
substituted (BlockStackSteps). `tests/passes/test_caching.py` checks every full variant against the
diffusers forward.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.ir import CACHED, FULL, DiffusionProgram

CACHE = "cache"  # name of the carried tensor (ONNX input/output and plan.json)
TRACE = "trace"  # every cut point's activation, for the cache search
MODES = (FULL, CACHED, TRACE)
# Families whose cache region is a range of transformer blocks (a residual is reused), and those whose
# region is a set of UNet levels (an up-path feature is reused).
BLOCK_FAMILIES = ("dit", "pixart")
LEVEL_FAMILIES = ("unet", "sd-unet")


def reuses_blocks(family: str) -> bool:
    return family in BLOCK_FAMILIES


def levels(program: DiffusionProgram) -> int:
    """How many levels a cache region can span: transformer blocks, UNet down blocks."""
    model = program.denoiser
    if program.spec.family in BLOCK_FAMILIES:
        return len(model.transformer_blocks)
    if program.spec.family in LEVEL_FAMILIES:
        return len(model.down_blocks)
    supported = ", ".join((*BLOCK_FAMILIES, *LEVEL_FAMILIES))
    raise ConfigError(f"feature caching does not support the '{program.spec.family}' family (supported: {supported})")


def check_region(program: DiffusionProgram, region: tuple[int, int]) -> None:
    first, stop = region
    n = levels(program)
    if not 0 <= first < stop <= n:
        raise ConfigError(f"cache region {region} is outside the model's {n} levels")
    if program.spec.family in LEVEL_FAMILIES:
        if first < 1 or stop != n:
            raise ConfigError(f"a UNet cache region is (first, {n}) with first >= 1 (levels recomputed), got {region}")
        if any(hasattr(b, "skip_conv") for b in (*program.denoiser.down_blocks, *program.denoiser.up_blocks)):
            raise ConfigError("UNet skip-connection block types (skip_conv) are not supported by feature caching")
        ups = sum(1 for b in program.denoiser.up_blocks if getattr(b, "upsamplers", None))
        if any(side % 2**ups for side in program.spec.sample_shape[1:]):
            raise ConfigError(f"feature caching needs a sample size divisible by {2**ups} (the UNet's upsampling)")


class StepsModule(nn.Module):
    """A family's forward with a cache region cut out, called like every graph variant as
    (sample, timestep, *condition tensors, *carried tensors): a cached variant carries one, `cache`."""

    def __init__(self, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]):
        super().__init__()
        self.model, self.region, self.mode, self.condition_names = model, region, mode, condition_names

    def split(
        self, sample: torch.Tensor, timestep: torch.Tensor, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """(condition tensors by name, the carried tensor or None)."""
        from core.adapters import same_batch

        same_batch(sample, timestep, *inputs)
        k = len(self.condition_names)
        cond = dict(zip(self.condition_names, inputs[:k], strict=True))
        return cond, (inputs[k] if len(inputs) > k else None)


class DiTSteps(StepsModule):
    """DiTTransformer2DModel forward with blocks [first, stop) cacheable."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *inputs: torch.Tensor):
        cond, cache = self.split(sample, timestep, inputs)
        class_labels = cond.get("class_labels")
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


class UNetSteps(StepsModule):
    """UNet2DModel forward with levels [first, n) cacheable (DeepCache)."""

    def _embedding(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels) -> torch.Tensor:
        m = self.model
        timesteps = timestep * torch.ones(sample.shape[0], dtype=timestep.dtype)
        emb = m.time_embedding(m.time_proj(timesteps).to(dtype=m.dtype))
        if m.class_embedding is not None:
            labels = m.time_proj(class_labels) if m.config.class_embed_type == "timestep" else class_labels
            emb = emb + m.class_embedding(labels).to(dtype=m.dtype)
        return emb

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *inputs: torch.Tensor):
        cond, cache = self.split(sample, timestep, inputs)
        class_labels = cond.get("class_labels")
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


class _Record(nn.Module):
    """Runs a block and records its input and/or output in `stash`."""

    def __init__(self, block: nn.Module, stash: dict[str, Any], into: str | None, out: str | None) -> None:
        super().__init__()
        self.block, self.stash, self.into, self.out = block, stash, into, out

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.into:
            self.stash[self.into] = hidden_states
        result = self.block(hidden_states, *args, **kwargs)
        if self.out:
            self.stash[self.out] = result
        return result


class _Reuse(nn.Module):
    """The cached region of a cached step: its first block adds the stored residual, the rest pass through."""

    def __init__(self, stash: dict[str, Any], first: bool) -> None:
        super().__init__()
        self.stash, self.first = stash, first

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states + self.stash[CACHE] if self.first else hidden_states


class ShellSteps(StepsModule):
    """The family adapter's own forward run on a shallow copy of the model (`shell`) whose block lists
    are swapped for wrappers that write and read `stash`; subclasses build the shell and say what a
    full or trace step carries out of the stash."""

    def __init__(self, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]):
        super().__init__(model, region, mode, condition_names)
        from core.adapters import adapter_for

        self.adapter = adapter_for(type(model).__name__)
        self.stash: dict[str, Any] = {}

    def _shell(self, **modules: nn.Module | None) -> nn.Module:
        shell = copy.copy(self.model)
        shell._modules = dict(self.model._modules)
        for name, module in modules.items():
            setattr(shell, name, module)
        return shell

    def carried(self) -> Any:
        """What a full step (the cache tensor) or a trace step (every cut point's activation) returns."""
        raise NotImplementedError

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *inputs: torch.Tensor):
        cond, cache = self.split(sample, timestep, inputs)
        self.stash.clear()
        self.stash[CACHE] = cache
        out = self.adapter.forward(self.shell, sample, timestep, cond)
        return out if self.mode == CACHED else (out, self.carried())


class BlockStackSteps(ShellSteps):
    """A transformer whose own forward loops over `transformer_blocks` (PixArt): blocks [first, stop)
    cacheable by substituting wrappers for them in a shallow copy, so the family's forward runs as is."""

    def __init__(self, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]):
        super().__init__(model, region, mode, condition_names)
        first, stop = region
        blocks: list[nn.Module] = list(model.transformer_blocks)
        if mode == TRACE:  # h_k: the input of block k; h_n: the last block's output
            blocks = [_Record(b, self.stash, f"h{k}", f"h{k + 1}") for k, b in enumerate(blocks)]
        elif mode == FULL:
            blocks[first] = _Record(blocks[first], self.stash, "entry", None)
            blocks[stop - 1] = _Record(blocks[stop - 1], self.stash, None, "exit")
        else:
            blocks[first:stop] = [_Reuse(self.stash, k == first) for k in range(first, stop)]
        self.shell = self._shell(transformer_blocks=nn.ModuleList(blocks))

    def carried(self) -> Any:
        if self.mode == FULL:
            return self.stash["exit"] - self.stash["entry"]
        return [self.stash[f"h{k}"] for k in range(len(self.model.transformer_blocks) + 1)]


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class _Into(nn.Module):
    """Runs a UNet block and records its input hidden states."""

    def __init__(self, block: nn.Module, stash: dict[str, Any], key: str) -> None:
        super().__init__()
        self.block, self.stash, self.key = block, stash, key
        self.resnets, self.has_cross_attention = block.resnets, getattr(block, "has_cross_attention", False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.stash[self.key] = _hidden(args, kwargs)
        return self.block(*args, **kwargs)


class _SkippedDown(nn.Module):
    """A down block inside the cached levels: computes nothing, but hands the up path as many
    placeholder skip tensors as the block would, so the up blocks' slicing of the skips is unchanged."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.count = len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
        self.has_cross_attention = getattr(block, "has_cross_attention", False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = _hidden(args, kwargs)
        return h, (h,) * self.count


class _SkippedMid(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.has_cross_attention = getattr(block, "has_cross_attention", False)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _SkippedUp(nn.Module):
    """An up block inside the cached levels: the last one hands on the stored feature."""

    def __init__(self, block: nn.Module, stash: dict[str, Any], last: bool) -> None:
        super().__init__()
        self.resnets, self.has_cross_attention = block.resnets, getattr(block, "has_cross_attention", False)
        self.stash, self.last = stash, last

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.stash[CACHE] if self.last else _hidden(args, kwargs)


class LevelSteps(ShellSteps):
    """DeepCache on a UNet whose own forward loops over down, mid and up blocks (SD's
    UNet2DConditionModel): levels [first, n) cacheable by substituting stubs for their blocks in a
    shallow copy. A refresh step records the input of up block n - first; a cached step skips every
    block of the cached levels and feeds that up block the stored feature."""

    def __init__(self, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]):
        super().__init__(model, region, mode, condition_names)
        first, n = region
        cut = n - first  # the first up block that is recomputed
        down, up = list(model.down_blocks), list(model.up_blocks)
        mid = model.mid_block
        if mode == TRACE:
            up = [_Into(b, self.stash, f"up{j}") for j, b in enumerate(up)]
        elif mode == FULL:
            up[cut] = _Into(up[cut], self.stash, "feature")
        else:
            down[first:] = [_SkippedDown(b) for b in down[first:]]
            mid = _SkippedMid(mid) if mid is not None else None
            up[:cut] = [_SkippedUp(b, self.stash, j == cut - 1) for j, b in enumerate(up[:cut])]
        self.shell = self._shell(down_blocks=nn.ModuleList(down), up_blocks=nn.ModuleList(up), mid_block=mid)

    def carried(self) -> Any:
        if self.mode == FULL:
            return self.stash["feature"]
        return [self.stash[f"up{j}"] for j in range(len(self.model.up_blocks))]


def steps_module(program: DiffusionProgram, mode: str, region: tuple[int, int] | None = None) -> nn.Module:
    """The network of `program` as the `mode` variant for `region` (default: the plan's cache region)."""
    if mode not in MODES:
        raise ValueError(f"unknown variant mode {mode!r}")
    if region is None:
        if program.plan.cache is None:
            raise ConfigError("the program has no cache schedule")
        region = program.plan.cache.region
    check_region(program, region)
    cls = {"dit": DiTSteps, "unet": UNetSteps, "sd-unet": LevelSteps}.get(program.spec.family, BlockStackSteps)
    return cls(program.denoiser, tuple(region), mode, program.spec.conditioning.input_names).eval()


def trace(program: DiffusionProgram, x: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
    """The activations at every cut point, one full forward: DiT h_0..h_N (block inputs and the last
    output), UNet the input of every up block."""
    n = levels(program)
    module = steps_module(program, TRACE, (0, n) if reuses_blocks(program.spec.family) else (n - 1, n))
    with torch.inference_mode():
        return module(x, t, *(cond[name] for name in program.spec.conditioning.input_names))[1]


def region_tensors(family: str, traced: list[torch.Tensor], region: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(the tensor a refresh step stores, the region's exit activation) from a trace.

    DiT (first, stop): (h_stop - h_first, h_stop); UNet (first, n): the input of up block n - first, twice.
    A cached step's error at the region exit is |stored_then - stored_now| / |exit_now|."""
    first, stop = region
    if reuses_blocks(family):
        return traced[stop] - traced[first], traced[stop]
    feature = traced[len(traced) - first]
    return feature, feature
