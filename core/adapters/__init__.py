"""Family adapters, one module each (`ADAPTER = ...`), found by scanning this package; and the
family-independent helpers built on them (the uniform `Denoiser` call, `respec`)."""

from __future__ import annotations

import dataclasses
from functools import cache

import torch
from torch import nn

from core.adapters.base import GUIDANCE, Adapter, same_batch
from core.discovery import module_members
from core.errors import LoadError
from core.ir import DiffusionProgram
from core.placement import at_denoiser, from_module
from core.sampling import Cond, DenoiseFn

__all__ = [
    "Adapter",
    "Denoiser",
    "adapter_for",
    "adapters",
    "denoiser_module",
    "parameter_count",
    "register",
    "respec",
    "same_batch",
]


@cache
def adapters() -> dict[str, Adapter]:
    """Every adapter module's ADAPTER, by the model class it handles."""
    return {a.model_class: a for a in module_members(__name__, "ADAPTER", ("base", "policy", "text")).values()}


def register(adapter: Adapter) -> None:
    """Add a family defined outside this package (a plugin, a test): one adapter, no technique edited."""
    known = adapters()
    if adapter.model_class in known and known[adapter.model_class] is not adapter:
        raise ValueError(f"a family for {adapter.model_class} is registered already")
    known[adapter.model_class] = adapter


def adapter_for(model_class: str) -> Adapter:
    known = adapters()
    if model_class not in known:
        raise LoadError(f"unsupported architecture '{model_class}' (supported: {', '.join(sorted(known))})")
    return known[model_class]


class Denoiser(nn.Module):
    """A uniform, export-friendly call: (sample, timestep[float, B], *condition tensors) -> model output,
    the condition tensors positional in `Conditioning.inputs` order (ONNX and TorchScript export alike)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        condition_names: tuple[str, ...],
        embedded_guidance: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.condition_names = condition_names
        self.embedded_guidance = embedded_guidance

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditions: torch.Tensor):
        same_batch(sample, timestep, *conditions)
        sample, timestep, placed = at_denoiser(self.model, sample, timestep, conditions)  # core.placement
        cond = dict(zip(self.condition_names, placed, strict=True))
        if self.embedded_guidance is not None:  # a constant of the graph, never an input
            cond[GUIDANCE] = torch.full_like(timestep, self.embedded_guidance)
        return from_module(self.adapter.forward(self.model, sample, timestep, cond))

    def apply(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The call with condition tensors by name (a core.sampling.DenoiseFn)."""
        return self(sample, timestep, *(cond[name] for name in self.condition_names))


def denoiser_module(program: DiffusionProgram) -> Denoiser:
    spec = program.spec
    adapter, cond = adapter_for(spec.model_class), spec.conditioning
    return Denoiser(program.denoiser, adapter, cond.input_names, cond.embedded_guidance).eval()


def torch_denoise(program: DiffusionProgram) -> DenoiseFn:
    """The program's denoiser as a loop callable, without autograd."""
    module = denoiser_module(program)

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        with torch.inference_mode():
            return module.apply(x, t, cond)

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
