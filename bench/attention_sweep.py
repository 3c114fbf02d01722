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

from backends.onnx_export import export_graph, export_onnx
from backends.ort import OrtDenoiser
from bench.scale import dit_config
from core.attention import GridAttention, LinearAttention, LocalAttention, local_halo
from core.errors import ConfigError
from core.flops import count_flops
from core.ir import Conditioning
from core.loading import program_from_model
from verify.timing import paired_median_ms

SIDES = (16, 32, 48, 64)  # token grids: 256, 1024, 2304, 4096 tokens


def memory_needed(side: int, heads: int, head_dim: int, radii: Sequence[float], tile: int) -> int:
    """Bytes one group of graphs timed side by side holds at one grid side (batch 2, fp32): softmax's
    N^2 scores, each local variant's N x keys scores plus its per-tile K and V gathers; linear attention's
    d x d summaries are small. Twice that for the copies a session's arena keeps (measured: about 10 GB
    at 4096 tokens, 12 heads, radii 4/8/16)."""
    tokens = side * side
    total = 2 * heads * tokens * tokens * 4
    for radius in radii:
        t, reach = local_halo((side, side), radius, tile)
        keys = (t + 2 * reach) ** 2
        total += 2 * heads * tokens * keys * 4 + 2 * 2 * heads * (tokens // (t * t)) * keys * head_dim * 4
    return 2 * total


def check_memory(
    sides: Sequence[int], heads: int, head_dim: int, radii: Sequence[float], tile: int, available: int
) -> None:
    needed, side = max((memory_needed(s, heads, head_dim, radii, tile), s) for s in sides)
    if needed > 0.8 * available:
        raise ConfigError(
            f"attention-sweep: {side * side} tokens with {heads} heads and local radii "
            f"{', '.join(f'{r:g}' for r in radii)} need about {needed / 2**30:.0f} GiB (attention scores in the "
            f"ONNX Runtime sessions timed side by side); {available / 2**30:.0f} GiB are available: use smaller "
            "--tokens, --radius or fewer --heads"
        )


def variants(
    grid: tuple[int, int], channels: int, radii: Sequence[float], tile: int
) -> dict[str, GridAttention | None]:
    """Each replacement of one block's self-attention (None: diffusers' own softmax processor)."""
    chosen: dict[str, GridAttention | None] = {
        "softmax": None,
        "linear (relu)": LinearAttention(grid, "relu"),
        "linear + conv (LiT)": LinearAttention(grid, "relu", conv=True, channels=channels),
    }
    for radius in radii:
        chosen[f"local r={radius:g} (CLEAR)"] = LocalAttention(grid, radius, tile)
    return chosen


def sweep(
    sides: Sequence[int] = SIDES,
    heads: int = 12,
    head_dim: int = 64,
    radii: Sequence[float] = (4.0, 8.0, 16.0),
    tile: int = 8,
    repeats: int = 5,
    log: Callable[[str], None] = print,
    only: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Rows per token count: each variant's latency (ms, batch 2 as with guidance) for the attention layer
    alone and for the whole block, speedups vs softmax, the attention layer's FLOPs per image and keys per
    query. Local attention: one variant per radius, queries in `tile` x `tile` tiles. `only`: the variants
    timed besides softmax, by name (default: all)."""
    rows = []
    for side in sides:
        torch.manual_seed(0)
        model = _dit_block(side, heads, head_dim).eval()
        program = program_from_model(model, conditioning=Conditioning(1000, 1000))
        x, t = torch.randn(2, 4, 2 * side, 2 * side), torch.tensor([500.0, 500.0])
        inputs = (x, t, {"class_labels": torch.tensor([1, 2])})
        hidden = torch.randn(2, side * side, heads * head_dim)
        feeds = {"hidden_states": hidden.numpy()}
        flops, keys, graphs = {}, {}, {}
        with tempfile.TemporaryDirectory(prefix="attention-sweep-") as tmp:
            chosen = variants((side, side), heads * head_dim, radii, tile)
            chosen = {n: p for n, p in chosen.items() if n == "softmax" or not only or n in only}
            for i, (name, processor) in enumerate(chosen.items()):
                block = copy.deepcopy(model)
                attn = block.transformer_blocks[0].attn1
                if processor is not None:
                    attn.set_processor(processor)
                flops[name] = count_flops(attn, hidden[:1])
                keys[name] = processor.keys_per_query if isinstance(processor, LocalAttention) else side * side
                layer = export_graph(_Layer(attn), (hidden,), ["hidden_states"], ["out"], Path(tmp) / f"a{i}.onnx")
                graphs[f"attention/{name}"] = layer
                graphs[f"block/{name}"] = export_onnx(block, program.spec, Path(tmp) / f"b{i}.onnx")
            # Layers side by side, then blocks: one group's sessions alive at a time (at 4096 tokens each
            # holds gigabytes of scores in its arena).
            ms: dict[str, float] = {}
            for part, args in (("attention", (feeds,)), ("block", inputs)):
                log(f"attention-sweep: {side * side} tokens: timing {len(chosen)} {part} graphs side by side ...")
                ms |= _time({k: g for k, g in graphs.items() if k.startswith(f"{part}/")}, part, args, repeats)
        row: dict[str, Any] = {"tokens": side * side, "variants": {}}
        for name in flops:
            row["variants"][name] = {
                "attention_gflops_per_image": flops[name] / 1e9,
                "keys_per_query": keys[name],  # linear attention: every token, through a d x d summary
                **{f"{part}_ms": ms[f"{part}/{name}"] for part in ("attention", "block")},
                **{f"{part}_speedup": ms[f"{part}/softmax"] / ms[f"{part}/{name}"] for part in ("attention", "block")},
            }
        rows.append(row)
    return rows


def _time(graphs: dict[str, Path], part: str, args: tuple, repeats: int) -> dict[str, float]:
    if part == "attention":
        fns = {k: OrtDenoiser(g, condition_names=()).session_fn() for k, g in graphs.items()}
        calls = {k: (lambda f=f: f(*args)) for k, f in fns.items()}
    else:
        runners = {k: OrtDenoiser(g) for k, g in graphs.items()}
        calls = {k: (lambda r=r: r(*args)) for k, r in runners.items()}
    return paired_median_ms(calls, repeats=repeats, warmup=1, rounds=2)


class _Layer(torch.nn.Module):
    """An attention layer alone, as a graph: hidden states in, the layer's output out."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attn(hidden_states)


def _dit_block(side: int, heads: int, head_dim: int) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**dit_config(layers=1, heads=heads, head_dim=head_dim, latent=2 * side))


def markdown(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["variants"])
    lines = []
    for part, title in (("attention", "The attention layer alone"), ("block", "The whole block (attention + MLP)")):
        lines += [f"{title}: ms (speedup vs softmax)", "", "| tokens | " + " | ".join(names) + " |"]
        lines.append("|" + "---|" * (len(names) + 1))
        for row in rows:
            cells = [_cell(row["variants"][n], part) for n in names]
            lines.append(f"| {row['tokens']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Attention layer GFLOPs per image (projections included); local attention's keys per query",
        "",
        "| tokens | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for row in rows:
        cells = [_flops_cell(row["variants"][n], row["tokens"]) for n in names]
        lines.append(f"| {row['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flops_cell(variant: dict[str, float], tokens: int) -> str:
    keys = variant["keys_per_query"]
    return f"{variant['attention_gflops_per_image']:.2f}" + (f" ({keys} keys)" if keys != tokens else "")


def _cell(variant: dict[str, float], part: str) -> str:
    return f"{variant[f'{part}_ms']:.1f} ({variant[f'{part}_speedup']:.2f}x)"
