"""Where and in what precision the torch side runs: `--device cpu|cuda[:N]`, `--dtype fp32|bf16|fp16`.

The modules (denoiser, text encoders, VAE) live on the device in the dtype; the sampling loop keeps its
latents in float32 on that device (as diffusers' pipelines upcast for the scheduler step); every module
call casts its floating inputs to the module's dtype at its boundary and returns float32 (`at_module`,
`at_denoiser`, `from_module`). Calibration files, condition tensors and metrics stay float32 on the host.
On float32 CPU modules the casts are no-ops decided in Python, so exported graphs are unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Placement:
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "fp32"  # a key of DTYPES

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_default(self) -> bool:
        return self == Placement()

    def describe(self) -> str:
        return f"torch {NAMES[self.dtype]} on {self.device}"


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, where N is a GPU this machine has."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU (torch sees none)")
    if index and int(index) >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")


def module_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of a module's first floating parameter or buffer (cpu/float32 if none)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):  # lazily: stops at the first
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def at_module(module: nn.Module, tensors: Iterable[Any]) -> tuple[Any, ...]:
    """`tensors` moved to the module's device, floating ones cast to its dtype; the same objects where they
    already match (a Python-level decision: nothing enters a traced graph on a float32 CPU module)."""
    device, dtype = module_placement(module)
    return tuple(_to(t, device, dtype) for t in tensors)


def at_denoiser(
    module: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, inputs: Iterable[Any]
) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    """A denoiser call's (sample, timestep, condition and carried tensors) in the module's placement: the
    timestep moved to its device but kept float32, as diffusers' timestep embeddings take it."""
    device, dtype = module_placement(module)
    placed = tuple(_to(t, device, dtype) for t in (sample, *inputs))
    return placed[0], _to(timestep, device, timestep.dtype), placed[1:]


def from_module(tensor: torch.Tensor) -> torch.Tensor:
    """A module's floating output as float32 (itself when it is float32 already)."""
    return tensor.float() if tensor.is_floating_point() and tensor.dtype != torch.float32 else tensor


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    target = dtype if value.is_floating_point() else value.dtype
    if value.device == device and value.dtype == target:
        return value
    return value.to(device=device, dtype=target)


def place_modules(modules: Iterable[nn.Module | None], placement: Placement) -> None:
    """Move modules (in place) to the placement's device and dtype; integer buffers keep their type."""
    for module in modules:
        if module is not None:  # nn.Module's own `to`: diffusers' override warns about fp32-kept modules
            nn.Module.to(module, device=placement.device, dtype=placement.torch_dtype)
