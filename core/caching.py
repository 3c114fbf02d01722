"""Feature caching across denoising steps: which regions a family can cache and the graph variant a
schedule runs (core.cache_variants), read from the family's adapter (its `cache_cut`, `block_stack` and
`cache_variant`), never from its name.

A range of the block stack (FORA / Δ-DiT / TeaCache style): blocks [first, stop) are replaced, at a cached
step, by the residual they added at the last refresh step. UNet levels (DeepCache): levels [first, n) -- the
down block, everything deeper and the matching up block -- are replaced by the feature they fed to the up
path. `tests/passes/test_caching.py` checks every full variant against the diffusers forward.
"""

from __future__ import annotations

import torch
from torch import nn

from core.adapters import adapter_for, adapters
from core.adapters.base import BLOCK_RANGE, UNET_LEVELS, Adapter
from core.cache_variants import CACHE, MODES, TRACE, BlockRangeVariant, LevelVariant
from core.errors import ConfigError
from core.ir import DiffusionProgram

__all__ = ["CACHE", "check_region", "levels", "region_tensors", "reuses_blocks", "trace", "variant_module"]

GENERIC = {BLOCK_RANGE: BlockRangeVariant, UNET_LEVELS: LevelVariant}


def _adapter(program: DiffusionProgram) -> Adapter:
    return adapter_for(program.spec.model_class)


def reuses_blocks(family: str) -> bool:
    """Whether the family's cache region is a range of its block stack (else: UNet levels)."""
    return any(a.family == family and a.cache_cut == BLOCK_RANGE for a in adapters().values())


def _cut(program: DiffusionProgram) -> type[BlockRangeVariant | LevelVariant]:
    """The generic variant of the family's cut kind, which knows its levels and admissible regions."""
    cut = _adapter(program).cache_cut
    if cut not in GENERIC:
        supported = ", ".join(sorted(a.family for a in adapters().values() if a.cache_cut))
        raise ConfigError(
            f"feature caching does not support the '{program.spec.family}' family (supported: {supported})"
        )
    return GENERIC[cut]


def levels(program: DiffusionProgram) -> int:
    """How many levels a cache region can span: the blocks of the stack, the UNet's down blocks."""
    return _cut(program).levels(_adapter(program), program.denoiser)


def check_region(program: DiffusionProgram, region: tuple[int, int]) -> None:
    first, stop = region
    n = levels(program)
    if not 0 <= first < stop <= n:
        raise ConfigError(f"cache region {region} is outside the model's {n} levels")
    _cut(program).check_region(program.denoiser, program.spec.sample_shape, region, n)


def variant_module(program: DiffusionProgram, mode: str, region: tuple[int, int] | None = None) -> nn.Module:
    """The network of `program` as the `mode` variant for `region` (default: the plan's cache region)."""
    if mode not in MODES:
        raise ValueError(f"unknown variant mode {mode!r}")
    if region is None:
        if program.plan.cache is None:
            raise ConfigError("the program has no cache schedule")
        region = program.plan.cache.region
    check_region(program, region)
    adapter, names, cut = _adapter(program), program.spec.conditioning.input_names, (region[0], region[1])
    module = adapter.cache_variant(program.denoiser, cut, mode, names)
    if module is None:
        module = _cut(program)(adapter, program.denoiser, cut, mode, names)
    return module.eval()


def trace(program: DiffusionProgram, x: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
    """The activations at every cut point, one full forward: a block stack's h_0..h_N (block inputs and the
    last output), a UNet's the input of every up block."""
    n = levels(program)
    module = variant_module(program, TRACE, (0, n) if reuses_blocks(program.spec.family) else (n - 1, n))
    with torch.inference_mode():
        return module(x, t, *(cond[name] for name in program.spec.conditioning.input_names))[1]


def region_tensors(family: str, traced: list[torch.Tensor], region: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(the tensor a refresh step stores, the region's exit activation) from a trace.

    Blocks (first, stop): (h_stop - h_first, h_stop); UNet levels (first, n): the input of up block n - first, twice.
    A cached step's error at the region exit is |stored_then - stored_now| / |exit_now|."""
    first, stop = region
    if reuses_blocks(family):
        return traced[stop] - traced[first], traced[stop]
    feature = traced[len(traced) - first]
    return feature, feature
