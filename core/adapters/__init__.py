"""Family adapters, one module each (`ADAPTER = ...`), found by scanning this package; and the
family-independent helpers built on them (the uniform `Denoiser` call, `respec`)."""

from __future__ import annotations

import dataclasses
from functools import cache

import torch
from torch import nn

from core.adapters.base import Adapter
from core.discovery import module_members
from core.errors import LoadError
from core.ir import DiffusionProgram
from core.sampling import DenoiseFn

__all__ = ["Adapter", "Denoiser", "adapter_for", "adapters", "denoiser_module", "parameter_count", "respec"]


@cache
def adapters() -> dict[str, Adapter]:
    """Every adapter module's ADAPTER, by the model class it handles."""
    return {a.model_class: a for a in module_members(__name__, "ADAPTER", ("base",)).values()}


def adapter_for(model_class: str) -> Adapter:
    known = adapters()
    if model_class not in known:
        raise LoadError(f"unsupported architecture '{model_class}' (supported: {', '.join(sorted(known))})")
    return known[model_class]


class Denoiser(nn.Module):
    """A uniform, export-friendly call: (sample, timestep[float, B], class_labels[int64, B]) -> eps."""

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        return self.adapter.forward(self.model, sample, timestep, class_labels)


def denoiser_module(program: DiffusionProgram) -> Denoiser:
    return Denoiser(program.denoiser, adapter_for(program.spec.model_class)).eval()


def torch_denoise(program: DiffusionProgram) -> DenoiseFn:
    """The program's denoiser as a loop callable, without autograd."""
    module = denoiser_module(program)

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            return module(x, t, y)

    return denoise


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def respec(
    program: DiffusionProgram, model: nn.Module, block_origin: tuple[int, ...] | None = None
) -> DiffusionProgram:
    """The program with a structurally changed denoiser (pruned, blocks removed) and its spec re-derived.
    `block_origin`: which original block each remaining block descends from (default: unchanged)."""
    spec = program.spec
    adapter = adapter_for(spec.model_class)
    new = adapter.spec(model, spec.conditioning, spec.prediction_type)
    origin = spec.block_origin if block_origin is None else tuple(block_origin)
    if origin is not None and len(origin) != len(new.blocks):
        raise ValueError(f"block lineage has {len(origin)} entries for {len(new.blocks)} blocks")
    return program.replace(denoiser=model.eval(), spec=dataclasses.replace(new, block_origin=origin))
