"""A quantized layer in the IR: the original Linear/Conv1d/2d/3d plus its formats, calibrated ranges and scales.

In torch it emulates the formats (fake quantization, `core.numerics`), which is what the passes
measure. For export it runs as the plain fp32 layer (`export_mode`), and `backends.qdq` then writes the
same numbers into the graph as QuantizeLinear/DequantizeLinear pairs with quantized weight initializers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core import numerics as nx

WEIGHT_FORMATS = ("int8", "fp8", "int4", "nvfp4")
ACTIVATION_FORMATS = ("none", "uint8", "int8", "fp8", "nvfp4")
BITS = {"int8": 8, "uint8": 8, "fp8": 8, "int4": 4, "nvfp4": 4, "none": 32}
CAPABILITY = {"int8": "int8", "uint8": "int8", "fp8": "fp8", "int4": "int4-weights", "nvfp4": "nvfp4"}
FOUR_BIT = ("int4", "nvfp4")  # block formats: Linear layers only


@dataclass(frozen=True)
class LayerFormat:
    weights: str
    activations: str = "none"
    block: int = 0  # int4 block size along the input dimension
    weight_bits: int = 8  # int8 weights: 7 is ONNX Runtime's `reduce_range` (values in [-64, 63])

    def describe(self) -> str:
        reduced = ", 7-bit weight range" if self.weights == "int8" and self.weight_bits == 7 else ""
        return f"W{BITS[self.weights]}A{BITS[self.activations]} ({self.weights}/{self.activations}{reduced})"


class QuantizedLayer(nn.Module):
    """`inner` is the layer with smoothing already folded into its weight (w * s over input channels)."""

    def __init__(
        self,
        inner: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d,
        fmt: LayerFormat,
        act_range: tuple[float, float],
        smooth: torch.Tensor | None = None,
        out_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.fmt = fmt
        self.emulate = True
        self.act_range = act_range
        channel_shape = (-1,) + (1,) * (inner.weight.dim() - 2)  # input channels over a conv's spatial axes
        inv = None if smooth is None else (1.0 / smooth).reshape(channel_shape)
        self.register_buffer("inv_smooth", inv)
        self.act_scale, self.act_zero_point = activation_params(fmt.activations, act_range)
        # uint8 output (Conv only): lets ONNX Runtime fuse DQ -> Conv -> Q into one integer QLinearConv.
        self.out_range = out_range
        self.out_scale, self.out_zero_point = nx.uint8_params(*out_range) if out_range else (1.0, 0)
        qweight, scales = quantize_weight(inner.weight.detach(), fmt)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        if not self.emulate:
            return self.inner(x)
        x = self.fake_activation(x)
        if isinstance(self.inner, nn.Linear):
            return F.linear(x, self.qweight, self.inner.bias)
        y = self.inner._conv_forward(x, self.qweight, self.inner.bias)  # the conv's own call, 1-D to 3-D
        if self.out_range is None:
            return y
        return nx.fake_int(y, torch.tensor(self.out_scale), torch.tensor(float(self.out_zero_point)), 0, 255)

    def fake_activation(self, x: torch.Tensor) -> torch.Tensor:
        kind, scale = self.fmt.activations, self.act_scale
        if kind == "uint8":
            return nx.fake_int(x, torch.tensor(scale), torch.tensor(float(self.act_zero_point)), 0, 255)
        if kind == "int8":
            return nx.fake_int(x, torch.tensor(scale), torch.zeros(()), -128, 127)
        if kind == "fp8":
            return nx.fake_fp8(x, torch.tensor(scale))
        if kind == "nvfp4":
            return nx.fake_nvfp4(x, torch.tensor(scale))[0]
        return x

    def extra_repr(self) -> str:
        return self.fmt.describe()


def activation_params(kind: str, act_range: tuple[float, float]) -> tuple[float, int]:
    """(scale, zero point) of the activation format for the calibrated range [lo, hi]."""
    lo, hi = act_range
    amax = torch.tensor(max(abs(lo), abs(hi)))
    if kind == "uint8":
        return nx.uint8_params(lo, hi)
    if kind == "int8":
        return float(nx.int8_symmetric_scale(amax)), 0
    if kind == "fp8":
        return float(nx.fp8_scale(amax)), 0
    if kind == "nvfp4":
        return float(nx.nvfp4_tensor_scale(amax)), 0
    return 1.0, 0


def quantize_weight(w: torch.Tensor, fmt: LayerFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight, scales): per output channel for 8-bit, per block for int4, E4M3 blocks for NVFP4."""
    if fmt.weights == "int8":
        return nx.fake_int8_weight(w, fmt.weight_bits)
    if fmt.weights == "fp8":
        scale = nx.fp8_scale(nx.channel_amax(w))
        return nx.fake_fp8(w, scale), scale.flatten()
    if w.dim() != 2:
        raise ValueError(f"{fmt.weights} weights are supported for Linear layers only")
    if fmt.weights == "int4":
        return nx.fake_int4_blocks(w, fmt.block)
    return nx.fake_nvfp4(w)


def quantized_layers(module: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantizedLayer)}


@contextlib.contextmanager
def export_mode(module: nn.Module) -> Iterator[None]:
    """Quantized layers run as plain fp32 layers (the graph gets its Q/DQ nodes afterwards)."""
    layers = list(quantized_layers(module).values())
    for layer in layers:
        layer.emulate = False
    try:
        yield
    finally:
        for layer in layers:
            layer.emulate = True
