"""`optimize attention-sweep`: one DiT block at growing token counts, softmax attention vs each
replacement (core.attention), lowered to ONNX and timed side by side in ONNX Runtime; attention FLOPs
counted on real calls. Random weights: latency does not depend on their values.

The shipped 16x16 DiT has 64 tokens, where attention is a small share of a block; the replacements are
meant for thousands of tokens. CLEAR reports its real speedup lagging its FLOP cut, and LinFusion users
report it slower than softmax at 512 px: this measures where each one starts paying, on this machine.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from backends.onnx_export import export_onnx
from backends.ort import OrtDenoiser
from bench.scale import dit_config
from core.attention import GridAttention, LinearAttention, LocalAttention
from core.flops import count_flops
from core.ir import Conditioning
from core.loading import program_from_model
from verify.timing import paired_median_ms

SIDES = (16, 32, 48, 64)  # token grids: 256, 1024, 2304, 4096 tokens


def variants(grid: tuple[int, int], channels: int, radius: float) -> dict[str, GridAttention | None]:
    """Each replacement of one block's self-attention (None: diffusers' own softmax processor)."""
    return {
        "softmax": None,
        "linear (relu)": LinearAttention(grid, "relu"),
        "linear + conv (LiT)": LinearAttention(grid, "relu", conv=True, channels=channels),
        f"local r={radius:g} (CLEAR)": LocalAttention(grid, radius),
    }


def sweep(
    sides: Sequence[int] = SIDES,
    heads: int = 12,
    head_dim: int = 64,
    radius: float = 8.0,
    repeats: int = 5,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Rows per token count: each variant's block latency (ms, batch 2 as with guidance), speedup vs
    softmax, and the attention layer's FLOPs per image."""
    rows = []
    for side in sides:
        torch.manual_seed(0)
        model = _dit_block(side, heads, head_dim).eval()
        program = program_from_model(model, conditioning=Conditioning(1000, 1000))
        x = torch.randn(2, 4, 2 * side, 2 * side)
        t, y = torch.tensor([500.0, 500.0]), {"class_labels": torch.tensor([1, 2])}
        grid = (side, side)
        calls, flops = {}, {}
        with tempfile.TemporaryDirectory(prefix="attention-sweep-") as tmp:
            for name, processor in variants(grid, heads * head_dim, radius).items():
                block = copy.deepcopy(model)
                attn = block.transformer_blocks[0].attn1
                if processor is not None:
                    attn.set_processor(processor)
                hidden = torch.randn(1, side * side, heads * head_dim)
                flops[name] = count_flops(lambda a=attn, h=hidden: a(h))
                path = export_onnx(block, program.spec, Path(tmp) / f"{len(calls)}.onnx")
                graph = OrtDenoiser(path)
                calls[name] = lambda g=graph, inputs=(x, t, y): g(*inputs)
            log(f"attention-sweep: {side * side} tokens: timing {len(calls)} variants side by side ...")
            ms = paired_median_ms(calls, repeats=repeats, warmup=1, rounds=2)
        base = ms["softmax"]
        rows.append(
            {
                "tokens": side * side,
                "variants": {
                    name: {
                        "block_ms": ms[name],
                        "speedup": base / ms[name],
                        "attention_gflops_per_image": flops[name] / 1e9,
                    }
                    for name in calls
                },
            }
        )
    return rows


def _dit_block(side: int, heads: int, head_dim: int) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**dit_config(layers=1, heads=heads, head_dim=head_dim, latent=2 * side))


def markdown(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["variants"])
    head = "| tokens | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    for row in rows:
        cells = []
        for name in names:
            v = row["variants"][name]
            cells.append(f"{v['block_ms']:.1f} ms ({v['speedup']:.2f}x), {v['attention_gflops_per_image']:.2f} GF")
        lines.append(f"| {row['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
