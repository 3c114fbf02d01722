"""Side by side on one model and one evaluation set: our searched cache schedules vs diffusers' cache hooks.

Every row samples the same seeds and classes, one image at a time (the batch size a dynamic hook such
as FirstBlockCache is meant for), under torch's FLOP counter: FLOPs per image are what each method
actually executed. Each peer configuration sets a FLOPs fraction; our rows are searched at that
fraction as a budget (never above it), so the comparison is at matched compute:
- ours: the cpu-cache recipe (guidance policy, then cache schedule) at the peer's budget;
- ours, cache only: the cache pass alone (guidance on every step, like FirstBlockCache and PAB);
- fewer steps: the original loop cut to the same fraction of its steps, the plain baseline.
Wall clock is torch per image, taken side by side in one run; only our rows lower to ONNX graphs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from bench.comparison import comparison_set
from bench.peer_caches import HookedDenoiser, PeerCache
from core.adapters import torch_denoise
from core.conditions import encode
from core.errors import ConfigError
from core.flops import count_flops
from core.ir import DiffusionProgram
from core.sampling import ConditionBatch, DenoiseFn, Variants, sample, uses_guidance
from core.variants import torch_loop
from passes.manager import offline_context, plan_passes, run_passes
from verify.timing import paired_median_ms
from verify.verdict import floor_cell

WIDE = (-1, 1000)  # every timestep of a 1000-step training schedule
DEFAULT_PEERS = (
    PeerCache("first-block-cache", {"threshold": 0.05}),
    PeerCache("first-block-cache", {"threshold": 0.1}),
    PeerCache("first-block-cache", {"threshold": 0.2}),
    PeerCache("pyramid-attention-broadcast", {"spatial_attention_block_skip_range": 2}),
    PeerCache(
        "pyramid-attention-broadcast",
        {"spatial_attention_block_skip_range": 3, "spatial_attention_timestep_skip_range": WIDE},
    ),
    PeerCache("faster-cache", {}),
    PeerCache(
        "faster-cache",
        {"spatial_attention_timestep_skip_range": WIDE, "unconditional_batch_timestep_skip_range": WIDE},
    ),
)
GUIDANCE = {"policy": "searched", "min_psnr_db": 35.0}  # the cpu-cache recipe's guidance pass


@dataclasses.dataclass
class Row:
    name: str
    kind: str  # "original", "peer", "ours: guidance + cache", "ours: cache only", "fewer steps"
    program: DiffusionProgram  # whose plan the row samples with
    denoise: DenoiseFn | Variants
    reset: Callable[[], None] | None = None  # a stateful hook: reset before every image, sampled one by one
    budget: float | None = None
    result: dict[str, Any] = dataclasses.field(default_factory=dict)


def compare_caching(
    program: DiffusionProgram,
    samples: int,
    calibration_samples: int,
    progress: Callable,
    log: Callable[[str], None],
    peers: tuple[PeerCache, ...] = DEFAULT_PEERS,
    cache_config: dict[str, Any] | None = None,
    timed_images: int = 4,
    timing_rounds: int = 3,
) -> list[dict[str, Any]]:
    """Rows as dicts (see _summary); `cache_config` overrides the cache pass's config (not its budget)."""
    spec = program.spec
    if not uses_guidance(program.plan, spec.conditioning):
        peers = tuple(p for p in peers if p.method != "faster-cache")  # it approximates the unconditional pass
    peers = tuple(p for p in peers if p.applies(spec.model_class))
    trajectories, seeds, conditions, _, verdict = comparison_set(program, samples, calibration_samples, log)
    batch = encode(program, conditions, len(seeds))

    def evaluate(row: Row) -> None:
        log(row.name)
        finals: list[torch.Tensor] = []
        flops = count_flops(lambda: finals.append(_sample(row, seeds, batch)))
        row.result = verdict(finals[0], [float("nan")])
        row.result["flops_per_image"] = flops / len(seeds)

    rows = [Row("original loop", "original", program, torch_denoise(program))]
    for peer in peers:
        hooked = HookedDenoiser(program, peer)
        rows.append(Row(peer.name, "peer", program, hooked, reset=hooked.reset))
    for row in progress(rows, desc="original and diffusers hooks"):
        evaluate(row)
    base = rows[0].result["flops_per_image"]
    budgets = sorted({_budget(r.result["flops_per_image"] / base) for r in rows[1:]} | {0.5})
    ctx = offline_context(program, trajectories, progress=progress)
    log("ours: guidance policy search")
    guided = run_passes(program, plan_passes([{"pass": "guidance", "config": GUIDANCE}], ctx.capabilities), ctx)
    ours: list[Row] = []
    for budget in progress(budgets, desc="our schedules at matched budgets"):
        for kind, start in (("ours: guidance + cache", guided), ("ours: cache only", program)):
            config = {**(cache_config or {}), "flops_budget": budget}
            log(f"{kind}: cache search at {budget:.2f} of the original FLOPs")
            try:
                candidate = run_passes(start, plan_passes([{"pass": "cache", "config": config}], ctx.capabilities), ctx)
            except ConfigError as exc:  # no schedule fits this budget
                log(f"  {exc}")
                continue
            twin = next((r for r in ours if r.kind == kind and r.program.plan == candidate.plan), None)
            row = twin or Row(_describe(kind, candidate), kind, candidate, torch_loop(candidate))
            ours.append(dataclasses.replace(row, budget=budget))
        steps = math.floor(budget * program.plan.num_inference_steps)
        if steps >= 1:
            cut = program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=steps))
            twin = next((r for r in ours if r.kind == "fewer steps" and r.program.plan == cut.plan), None)
            row = twin or Row(f"{steps} steps", "fewer steps", cut, torch_denoise(cut))
            ours.append(dataclasses.replace(row, budget=budget))
    unique = list({id(r.denoise): r for r in ours}.values())
    for row in progress(unique, desc="our rows"):
        evaluate(row)
    for row in ours:  # budget twins share the evaluation
        row.result = next(u.result for u in unique if u.denoise is row.denoise)
    rows += ours
    log(f"timing: {timed_images} images one by one per call, torch, every row side by side")
    timed_seeds = seeds[:timed_images]
    timed_batch = batch.rows(slice(0, timed_images))
    timed = paired_median_ms(
        {str(id(r.denoise)): functools.partial(_sample, r, timed_seeds, timed_batch, one_by_one=True) for r in rows},
        repeats=2 * timing_rounds,
        warmup=1,
        rounds=timing_rounds,
    )
    original_ms = timed[str(id(rows[0].denoise))]
    return [
        _summary(r, base, timed[str(id(r.denoise))] / len(timed_seeds), original_ms / len(timed_seeds)) for r in rows
    ]


def _budget(fraction: float) -> float:
    """A peer's FLOPs fraction as our budget: rounded down, so our schedule never computes more."""
    return math.floor(100 * fraction + 1e-9) / 100


def _sample(row: Row, seeds: list[int], batch: ConditionBatch, one_by_one: bool = False) -> torch.Tensor:
    """A static schedule samples the batch at once; a stateful hook one image at a time, reset before each."""
    plan, shape = row.program.plan, row.program.spec.sample_shape
    if row.reset is None and not one_by_one:
        return sample(plan, shape, row.denoise, seeds, batch)
    finals = []
    for i, seed in enumerate(seeds):
        if row.reset is not None:
            row.reset()
        finals.append(sample(plan, shape, row.denoise, [seed], batch.rows(slice(i, i + 1))))
    return torch.cat(finals)


def _describe(kind: str, program: DiffusionProgram) -> str:
    decision = program.decision("cache")
    refresh = len(decision.refresh_steps)
    parts = [f"{kind}: region {decision.region}, {refresh}/{program.plan.num_inference_steps} refreshes"]
    parts.append(decision.criterion)
    if program.decision("guidance") is not None and program.plan.guided_steps is not None:
        parts.append(f"guidance on {sum(program.plan.guided_steps)} steps")
    return ", ".join(parts)


def _summary(row: Row, base_flops: float, ms: float, original_ms: float) -> dict[str, Any]:
    r = row.result
    keys = (
        "psnr_db_mean",
        "psnr_db_min",
        "ssim_mean",
        "class_agreement_reference",
        "class_agreement_candidate",
        "fd_reference_to_data",
        "fd_candidate_to_data",
        *(f"fd_self_{k}" for k in ("ratio", "candidate", "floor")),
    )
    return {
        "name": row.name,
        "kind": row.kind,
        "budget": row.budget,
        "flops_per_image": r["flops_per_image"],
        "flops_fraction": r["flops_per_image"] / base_flops,
        "torch_ms_per_image": ms,
        "speedup": original_ms / ms,
        "calibration_psnr_db": getattr(row.program.decision("cache"), "calibration_psnr_db", None),
        **{k: r[k] for k in keys if k in r},
    }


def matched(rows: list[dict[str, Any]]) -> list[tuple[dict, dict | None, dict | None]]:
    """(peer, ours, fewer steps) at the peer's budget. "Ours" is whichever of guidance + cache and
    cache only scored higher on the calibration seeds, the choice a user of the passes can make
    without seeing the evaluation set."""
    out = []
    for peer in (r for r in rows if r["kind"] == "peer"):
        budget = _budget(peer["flops_fraction"])
        same = [r for r in rows if r["budget"] == budget]
        ours = [r for r in same if r["kind"].startswith("ours")]
        best = max(ours, key=lambda r: r["calibration_psnr_db"], default=None)
        steps = next((r for r in same if r["kind"] == "fewer steps"), None)
        out.append((peer, best, steps))
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def quality(r: dict | None) -> str:
        return "-" if r is None else f"{r['psnr_db_mean']:.2f} / {r['ssim_mean']:.3f}"

    def cost(r: dict | None) -> str:
        return "-" if r is None else f"{r['flops_fraction']:.3f} / {r['speedup']:.2f}x"

    lines = [
        "At matched compute (our budget = the peer's FLOPs fraction, rounded down):",
        "",
        "| diffusers hook | FLOPs / torch speedup | PSNR dB / SSIM | ours (picked on calibration) | "
        "FLOPs / torch speedup | PSNR dB / SSIM | fewer steps: PSNR / SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for peer, ours, steps in matched(rows):
        name = "-" if ours is None else ours["name"]
        lines.append(
            f"| {peer['name'].removeprefix('diffusers ')} | {cost(peer)} | {quality(peer)} | {name} | "
            f"{cost(ours)} | {quality(ours)} | {'-' if steps is None else steps['name'] + ': ' + quality(steps)} |"
        )
    lines += [
        "",
        "Every row (FLOPs per image as a fraction of the original loop's; torch wall clock per image, side by side):",
        "",
        "| row | budget | FLOPs | torch ms/image (speedup) | PSNR mean / min dB | SSIM | class agreement | "
        "FD to data | shift (FD / floor), denoiser features | calibration PSNR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    budgets: dict[str, list[str]] = {}
    first: dict[str, dict] = {}
    for r in rows:  # a schedule that won at several budgets is listed once
        budgets.setdefault(r["name"], []).append("-" if r["budget"] is None else f"{r['budget']:.2f}")
        first.setdefault(r["name"], r)
    for r in first.values():
        agree, fd, cal = r.get("class_agreement_candidate"), r.get("fd_candidate_to_data"), r["calibration_psnr_db"]
        lines.append(
            f"| {r['name']} | {', '.join(budgets[r['name']])} | {r['flops_fraction']:.3f} | "
            f"{r['torch_ms_per_image']:.1f} ({r['speedup']:.2f}x) | {r['psnr_db_mean']:.2f} / {r['psnr_db_min']:.2f} | "
            f"{r['ssim_mean']:.3f} | {'n/a' if agree is None else f'{agree:.2f}'} | "
            f"{'n/a' if fd is None else f'{fd:.2f}'} | {floor_cell(r, 'fd_self')} | "
            f"{'-' if cal is None else f'{cal:.2f}'} |"
        )
    return "\n".join(lines)
