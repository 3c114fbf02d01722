"""Reference numerics of the low-precision formats: fake quantization (quantize, then dequantize) in fp32.

Rounding is round-half-to-even and values saturate, as ONNX QuantizeLinear and TensorRT do.
- int8 / uint8: scale (+ zero point for uint8), per tensor or per output channel.
- fp8 E4M3 (finite max 448): per-tensor or per-channel scale = amax / 448.
- int4: symmetric, one scale per block of `block` input elements (W4A8 on Hopper).
- NVFP4: FP4 E2M1 values (max 6) in blocks of 16 with an E4M3 block scale and an fp32 tensor scale.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_BLOCK = 16
FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_FP4_MIDPOINTS = (FP4_GRID[1:] + FP4_GRID[:-1]) / 2
_FP4_ODD = torch.tensor([False, True, False, True, False, True, False, True])  # mantissa bit set
_TINY = 1e-12


def fake_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero point) for the range [lo, hi]; the range always holds 0 exactly."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, _TINY)
    return scale, int(min(255, max(0, round(-lo / scale))))


def int8_symmetric_scale(amax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    return torch.clamp(amax, min=_TINY) / (2 ** (bits - 1) - 1)


def channel_amax(w: torch.Tensor) -> torch.Tensor:
    """|w| max per output channel (dim 0), shaped to broadcast against w."""
    return w.abs().reshape(w.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def fake_int8_weight(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 (`bits` 7: the reduced range, values in [-64, 63]);
    returns (dequantized weight, scales [out])."""
    scale = int8_symmetric_scale(channel_amax(w), bits)
    return fake_int(w, scale, torch.zeros(()), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1), scale.flatten()


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value (ties to even), saturating at +-448."""
    return torch.clamp(x, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return round_fp8(x / scale) * scale


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.clamp(amax, min=_TINY) / FP8_MAX


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6; ties to even mantissa), saturating at +-6."""
    a = x.abs()
    idx = torch.bucketize(a, _FP4_MIDPOINTS.to(a.device))  # a == midpoint[i] -> i (the lower neighbour)
    at_tie = (idx < len(_FP4_MIDPOINTS)) & (a == _FP4_MIDPOINTS.to(a.device)[idx.clamp(max=len(_FP4_MIDPOINTS) - 1)])
    idx = idx + (at_tie & _FP4_ODD.to(a.device)[idx]).long()
    return torch.sign(x) * FP4_GRID.to(x.device, x.dtype)[idx]


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def fake_int4_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 over blocks of the last dim; returns (dequantized, scales [..., n_blocks])."""
    b = _blocks(w, block)
    scale = int8_symmetric_scale(b.abs().amax(dim=-1, keepdim=True), bits=4)
    return fake_int(b, scale, torch.zeros(()), -8, 7).reshape(w.shape), scale.squeeze(-1)


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """The fp32 second-level scale: maps the tensor's amax onto (max FP4) x (max E4M3)."""
    return torch.clamp(amax, min=_TINY) / (FP4_MAX * FP8_MAX)


def fake_nvfp4(x: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 over blocks of 16 along the last dim; returns (dequantized, E4M3 block scales).

    `tensor_scale` defaults to one computed from x's own amax (weights); for activations pass the
    calibrated one (the block scales are always computed from the data, as the hardware does).
    """
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(x.abs().amax())
    b = _blocks(x, NVFP4_BLOCK)
    block_scale = round_fp8(b.abs().amax(dim=-1, keepdim=True) / (FP4_MAX * tensor_scale))
    step = block_scale * tensor_scale
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.where(step > 0, round_fp4(b / safe), torch.zeros_like(b))
    return (q * step).reshape(x.shape), block_scale.squeeze(-1)
