"""The graph variants of a cache schedule, as modules: a forward with a cache region cut out.

Every variant is called as (sample, timestep, *condition tensors, *carried tensors) and exports to ONNX
as a plain graph. A family's adapter may restate its own forward with the cut points exposed (the DiT and
UNet2DModel adapters do, see their `cache_variant`); otherwise the generic variant of its cut kind runs the
adapter's forward on a shallow copy of the model whose blocks are substituted: `BlockRangeVariant` (a range
of the block stack reused as a residual) or `LevelVariant` (UNet levels reused as an up-path feature).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from core.adapters.base import Adapter, same_batch
from core.errors import ConfigError
from core.ir import CACHED, FULL
from core.placement import at_denoiser

CACHE = "cache"  # name of the carried tensor (ONNX input/output and plan.json)
TRACE = "trace"  # every cut point's activation, for the cache search
MODES = (FULL, CACHED, TRACE)


class CacheVariant(nn.Module):
    """A family's forward with a cache region cut out, called like every graph variant as
    (sample, timestep, *condition tensors, *carried tensors): a cached variant carries one, `cache`."""

    def __init__(self, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]):
        super().__init__()
        self.model, self.region, self.mode, self.condition_names = model, region, mode, condition_names

    def split(
        self, sample: torch.Tensor, timestep: torch.Tensor, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(sample, timestep, condition tensors by name, the carried tensor or None), in the model's
        placement (core.placement; the timestep stays float32)."""
        same_batch(sample, timestep, *inputs)
        sample, timestep, placed = at_denoiser(self.model, sample, timestep, inputs)
        k = len(self.condition_names)
        cond = dict(zip(self.condition_names, placed[:k], strict=True))
        return sample, timestep, cond, (placed[k] if len(placed) > k else None)


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


class ShellVariant(CacheVariant):
    """The family adapter's own forward run on a shallow copy of the model (`shell`) whose block lists
    are swapped for wrappers that write and read `stash`; subclasses build the shell and say what a
    full or trace step carries out of the stash."""

    def __init__(
        self, adapter: Adapter, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]
    ):
        super().__init__(model, region, mode, condition_names)
        self.adapter = adapter
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
        sample, timestep, cond, cache = self.split(sample, timestep, inputs)
        self.stash.clear()
        self.stash[CACHE] = cache
        out = self.adapter.forward(self.shell, sample, timestep, cond)
        return out if self.mode == CACHED else (out, self.carried())


class BlockRangeVariant(ShellVariant):
    """A transformer whose own forward loops over its block stack (the adapter's `block_stack`; PixArt):
    blocks [first, stop) cacheable by substituting wrappers for them in a shallow copy, so the family's
    forward runs as is."""

    def __init__(
        self, adapter: Adapter, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]
    ):
        super().__init__(adapter, model, region, mode, condition_names)
        first, stop = region
        blocks: list[nn.Module] = list(adapter.blocks(model))
        if mode == TRACE:  # h_k: the input of block k; h_n: the last block's output
            blocks = [_Record(b, self.stash, f"h{k}", f"h{k + 1}") for k, b in enumerate(blocks)]
        elif mode == FULL:
            blocks[first] = _Record(blocks[first], self.stash, "entry", None)
            blocks[stop - 1] = _Record(blocks[stop - 1], self.stash, None, "exit")
        else:
            blocks[first:stop] = [_Reuse(self.stash, k == first) for k in range(first, stop)]
        self.shell = self._shell(**{str(adapter.block_stack): nn.ModuleList(blocks)})

    @staticmethod
    def levels(adapter: Adapter, model: nn.Module) -> int:
        return len(adapter.blocks(model))

    @staticmethod
    def check_region(model: nn.Module, sample_shape: tuple[int, ...], region: tuple[int, int], n: int) -> None:
        """Any range of the stack is a region."""

    def carried(self) -> Any:
        if self.mode == FULL:
            return self.stash["exit"] - self.stash["entry"]
        return [self.stash[f"h{k}"] for k in range(len(self.adapter.blocks(self.model)) + 1)]


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


class LevelVariant(ShellVariant):
    """DeepCache on a UNet whose own forward loops over down, mid and up blocks (SD's
    UNet2DConditionModel): levels [first, n) cacheable by substituting stubs for their blocks in a
    shallow copy. A refresh step records the input of up block n - first; a cached step skips every
    block of the cached levels and feeds that up block the stored feature."""

    def __init__(
        self, adapter: Adapter, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]
    ):
        super().__init__(adapter, model, region, mode, condition_names)
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

    @staticmethod
    def levels(adapter: Adapter, model: nn.Module) -> int:
        return len(model.down_blocks)

    @staticmethod
    def check_region(model: nn.Module, sample_shape: tuple[int, ...], region: tuple[int, int], n: int) -> None:
        """A region is the deepest levels (first, n), first >= 1; the UNet's block types and sample size fit."""
        first, stop = region
        if first < 1 or stop != n:
            raise ConfigError(f"a UNet cache region is (first, {n}) with first >= 1 (levels recomputed), got {region}")
        if any(hasattr(b, "skip_conv") for b in (*model.down_blocks, *model.up_blocks)):
            raise ConfigError("UNet skip-connection block types (skip_conv) are not supported by feature caching")
        ups = sum(1 for b in model.up_blocks if getattr(b, "upsamplers", None))
        if any(side % 2**ups for side in sample_shape[1:]):
            raise ConfigError(f"feature caching needs a sample size divisible by {2**ups} (the UNet's upsampling)")

    def carried(self) -> Any:
        if self.mode == FULL:
            return self.stash["feature"]
        return [self.stash[f"up{j}"] for j in range(len(self.model.up_blocks))]
