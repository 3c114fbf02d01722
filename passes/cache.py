"""Cache schedule: reuse a region's features across steps, refresh steps searched under a FLOPs budget.

Mechanisms (core.caching): DiT -- blocks [first, stop) are replaced by the residual they added at
the last refresh step (FORA / Δ-DiT; (0, N) is TeaCache's whole-stack residual, (1, N) first-block
cache); UNet -- DeepCache, the levels from `first` down are replaced by the feature they fed the up path.

Search (BAC's scheduler idea): on the calibration trajectories, for every candidate region, the error a
reuse injects at the region's exit, err(j -> i) = |stored_j - stored_i| / |exit_i|, for every pair of
refresh step j and later step i. For each region the refresh steps minimizing the summed error under
the FLOPs budget are found exactly (dynamic programming over segments); `uniform` refreshes every k
steps instead (FORA), `first-block` refreshes when the accumulated relative change of the first
block's residual crosses a threshold (TeaCache / first-block cache, decided on the calibration mean).
The summed per-step error is only a proxy (an error's effect on the final sample depends on the
step), so every region's schedule from each criterion is run end to end on the calibration seeds and
the one closest to the original loop wins. With `min_psnr_db` the budget is a ceiling on quality's
terms: when no schedule under it keeps that end-to-end PSNR on the calibration seeds, the budget is
relaxed in steps of BUDGET_STEP toward the original's FLOPs and the search repeats; the budget
reached is reported (a pass that cannot keep it at any saving refuses). `max_fd_shift` relaxes the budget
the same way until the best schedule's samples keep the original's distribution (verify.floor_check, the
verification's distribution shift: a 20-step pixel DiT at half the FLOPs kept 31 dB per seed, and its
distribution moved to 1.63 of the floor at verification, under the former FD ratio). The schedule is static: it is
stored in the SamplingPlan and lowered to graph variants ("full" writes the cache tensor, "cached" reads it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

from core.caching import check_region, levels, region_tensors, reuses_blocks, trace
from core.errors import ConfigError
from core.flops import variant_flops
from core.ir import CACHED, DENOISER, CacheSchedule, Decision, DiffusionProgram, SamplingPlan
from core.limits import MAX_INPUTS
from core.sampling import take, uses_guidance
from core.schedulers import model_calls
from core.validate import is_int
from passes.analyses import FLOPS
from passes.base import Context, Pass, PassResult, Phase, check_distribution_options
from verify.fidelity import replay_psnr

if TYPE_CHECKING:
    from verify.floor_check import FloorCheck

CRITERIA = ("all", "similarity", "uniform", "first-block")
BUDGET_STEP = 0.05  # relaxation of flops_budget when min_psnr_db is not met


@dataclass
class Config:
    flops_budget: float = 0.5  # denoiser FLOPs per image, as a fraction of the reference loop's (original network)
    criterion: str = "all"  # "similarity" (BAC-style), "uniform" (FORA), "first-block" (TeaCache) or all of them
    regions: list = field(default_factory=list)  # [[first, stop], ...] to consider; [] = every admissible one
    probe_samples: int = 8  # calibration samples whose features score the reuse errors
    min_psnr_db: float = 0.0  # end-to-end PSNR on the calibration seeds the schedule must keep (0: none)
    max_fd_shift: float = 0.0  # distribution shift the schedule's samples must keep (0: not checked)
    check_samples: int = 100  # samples of the distribution check (its seed-to-seed noise shrinks with more)


def check(config: Config, capabilities: frozenset[str]) -> None:
    if not 0.0 < config.flops_budget <= 1.0:
        raise ConfigError("cache: flops_budget is a fraction of the original FLOPs, in (0, 1]")
    if config.criterion not in CRITERIA:
        raise ConfigError(f"cache: unknown criterion '{config.criterion}' (known: {', '.join(CRITERIA)})")
    if not 0.0 <= config.min_psnr_db <= 200.0:
        raise ConfigError("cache: min_psnr_db must be in [0, 200] dB")
    check_distribution_options("cache", config.max_fd_shift, config.check_samples)
    if not 1 <= config.probe_samples <= MAX_INPUTS:
        raise ConfigError(f"cache: probe_samples must be in [1, {MAX_INPUTS}]")
    if not all(isinstance(r, list | tuple) and len(r) == 2 and all(is_int(i) for i in r) for r in config.regions):
        raise ConfigError("cache: regions must be [[first, stop], ...]")


@dataclass(frozen=True)
class CacheDecision(Decision):
    criterion: str
    criteria_tried: list[str]
    region: list[int]
    family: str
    refresh_steps: list[int]
    calibration_psnr_db: float
    flops_per_image_before: int
    flops_per_image_after: int
    flops_vs_original: float
    flops_budget: float
    min_psnr_db: float
    flops_budget_reached: float  # flops_budget, relaxed until min_psnr_db (and max_fd_shift) held
    candidates: list[dict[str, Any]]  # best first: each region's schedule per criterion, run end to end
    max_fd_shift: float = 0.0
    distribution: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per budget: best, its shift
    floor_fd: float | None = None

    title = "Cache schedule"

    def _relaxed(self) -> str:
        kept = [f"the {self.min_psnr_db:g} dB floor"] if self.min_psnr_db else []
        if self.max_fd_shift:
            kept.append(f"distribution shift {self.max_fd_shift:g}")
        if not kept:
            return ""
        if self.flops_budget_reached == self.flops_budget:
            return f", which kept {' and '.join(kept)}"
        return f", relaxed to {self.flops_budget_reached:g} to keep {' and '.join(kept)}"

    def _distribution(self) -> list[str]:
        if not self.distribution:
            return []
        lines = [
            "",
            f"Distribution check (the distribution shift, verify.metrics.distribution_shift; the original's own FD"
            f" to the floor set {self.floor_fd:.4g}; bound {self.max_fd_shift:g}), the best schedule at each budget:",
            "",
            "| budget | region | refresh steps | calibration PSNR (dB) | distribution shift |",
            "|---|---|---|---|---|",
        ]
        return lines + [
            f"| {r['budget']:g} | {r['region']} | {r['refresh_steps']} | {r['calibration_psnr_db']} |"
            f" {r['fd_shift']:.3g} |"
            for r in self.distribution
        ]

    def markdown(self) -> list[str]:
        first, stop = self.region
        if reuses_blocks(self.family):
            region = f"transformer blocks {first}..{stop - 1} reuse their residual"
        else:
            region = f"levels {first}..{stop - 1} and deeper reuse their up-path feature (DeepCache)"
        lines = [
            f"- {self.family} region {self.region} ({region}), schedule from criterion `{self.criterion}`"
            f" (tried: {', '.join(self.criteria_tried)})",
            f"- refresh (full) steps: {self.refresh_steps}; every other step reuses the cached tensor",
            f"- FLOPs: {self.flops_vs_original:.3f} of the original network's on this loop, per image (budget"
            f" {self.flops_budget}{self._relaxed()});"
            f" end-to-end PSNR on the calibration seeds {self.calibration_psnr_db} dB",
            "",
            "Best candidates (each region's schedule per criterion under the budget, run end to end on the"
            " calibration seeds):",
            "",
            "| criterion | region | refresh steps | reuse error (proxy) | FLOPs vs original | calibration PSNR (dB) |",
            "|---|---|---|---|---|---|",
        ]
        return (
            lines
            + [
                f"| {r['criterion']} | {r['region']} | {r['refresh_steps']} | {r['proxy_error']} |"
                f" {r['flops_vs_original']} | {r['calibration_psnr_db']} |"
                for r in self.candidates[:10]
            ]
            + self._distribution()
        )


@dataclass(frozen=True)
class Candidate:
    criterion: str
    region: tuple[int, int]
    refresh: tuple[int, ...]
    proxy_error: float
    flops: int


def check_program(config: Config, program: DiffusionProgram) -> None:
    """The family supports caching, the criterion suits it and every given region fits the network."""
    if program.plan.cache is not None:
        raise ConfigError("cache: the plan already has a cache schedule")
    levels(program)  # refuses unsupported families
    if config.criterion == "first-block" and not reuses_blocks(program.spec.family):
        raise ConfigError("cache: the first-block criterion needs a transformer stack; use similarity or uniform")
    for region in config.regions:
        check_region(program, tuple(region))


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    check_program(config, program)  # again: an earlier pass may have removed blocks
    plan, steps = program.plan, model_calls(program.plan)
    criteria = [config.criterion] if config.criterion != "all" else list(CRITERIA[1:])
    if not reuses_blocks(program.spec.family) and "first-block" in criteria:
        criteria.remove("first-block")
    regions = [tuple(r) for r in config.regions] or admissible_regions(program)
    if ctx.calibration.steps != steps:
        raise ConfigError("cache: the calibration trajectories do not match the plan's step count")
    reference_flops = ctx.flops(ctx.reference)["per_image"]
    before = ctx.flops(program)
    guided = uses_guidance(plan, program.spec.conditioning)
    weights = [2 if guided and plan.guided(i) else 1 for i in range(steps)]
    full_flops = before["per_variant"][DENOISER]
    traces = _traces(program, ctx, config.probe_samples)
    change = _first_block_change(traces, plan, guided, config.probe_samples) if "first-block" in criteria else []
    costs = {}
    for region in ctx.progress(regions, desc="cache costs", leave=False):
        costs[region] = (
            variant_flops(program, region)[CACHED],
            _reuse_costs(traces, program.spec.family, region, plan, guided, config.probe_samples),
        )
    scored: list[tuple[float, Candidate]] = []
    check = None
    if config.max_fd_shift:  # the original's distribution, sampled once
        check = ctx.distribution_check(config.check_samples)
    checked: list[dict[str, Any]] = []
    fraction = config.flops_budget
    while True:
        fresh = _candidates(costs, criteria, weights, full_flops, fraction * reference_flops, change, scored)
        why = f", distribution shift {checked[-1]['fd_shift']:.3g} at {checked[-1]['budget']:.2f}" if checked else ""
        for c in ctx.progress(fresh, desc=f"cache end-to-end (budget {fraction:.2f}{why})", leave=False):
            scored.append((replay_psnr(program.replace(plan=_with_cache(plan, program, c)), ctx.calibration), c))
        within = [sc for sc in scored if sc[1].flops <= fraction * reference_flops]
        psnr_held = within and (config.min_psnr_db <= 0 or max(p for p, _ in within) >= config.min_psnr_db)
        if psnr_held and (check is None or _distribution_held(program, within, fraction, check, config, checked)):
            break
        if (config.min_psnr_db <= 0 and check is None) or fraction >= 1.0:  # nothing to relax toward, or left
            _refuse(config, scored, checked, before["per_image"] / reference_flops)
        fraction = min(1.0, round(fraction + BUDGET_STEP, 6))
    best_psnr, best = _best(within)
    decision = CacheDecision(
        criterion=best.criterion,
        criteria_tried=criteria,
        region=list(best.region),
        family=program.spec.family,
        refresh_steps=list(best.refresh),
        calibration_psnr_db=round(best_psnr, 2),
        flops_per_image_before=before["per_image"],
        flops_per_image_after=best.flops,
        flops_vs_original=round(best.flops / reference_flops, 4),
        flops_budget=config.flops_budget,
        min_psnr_db=config.min_psnr_db,
        flops_budget_reached=fraction,
        max_fd_shift=config.max_fd_shift,
        distribution=checked,
        floor_fd=None if check is None else check.floor,
        candidates=[
            {
                "criterion": c.criterion,
                "region": list(c.region),
                "refresh_steps": list(c.refresh),
                "proxy_error": round(c.proxy_error, 4),
                "flops_vs_original": round(c.flops / reference_flops, 4),
                "calibration_psnr_db": round(p, 2),
            }
            for p, c in sorted(scored, key=lambda s: -s[0])
        ],
    )
    return PassResult(program.replace(plan=_with_cache(plan, program, best)), decision)


def _best(within: list[tuple[float, Candidate]]) -> tuple[float, Candidate]:
    """The schedule closest to the original end to end (the cheaper one on a tie)."""
    return max(within, key=lambda s: (s[0], -s[1].flops))


def _distribution_held(
    program: DiffusionProgram,
    within: list[tuple[float, Candidate]],
    fraction: float,
    check: FloorCheck,
    config: Config,
    checked: list[dict[str, Any]],
) -> bool:
    """Whether the best schedule under the budget keeps the original's distribution (recorded in `checked`;
    a schedule already checked at a tighter budget is not sampled again)."""
    psnr_db, best = _best(within)
    region, refresh = list(best.region), list(best.refresh)
    shift = next((r["fd_shift"] for r in checked if (r["region"], r["refresh_steps"]) == (region, refresh)), None)
    if shift is None:
        shift = check.shift(program.replace(plan=_with_cache(program.plan, program, best)))
    checked.append(
        {
            "budget": fraction,
            "region": region,
            "refresh_steps": refresh,
            "calibration_psnr_db": round(psnr_db, 2),
            "fd_shift": shift,
        }
    )
    return shift <= config.max_fd_shift


def _refuse(config: Config, scored: list, checked: list[dict[str, Any]], loop_fraction: float) -> None:
    if not scored:
        raise ConfigError(
            f"cache: no schedule fits flops_budget {config.flops_budget} (the loop alone needs "
            f"{loop_fraction:.3f} of the original FLOPs before caching)"
        )
    if checked and checked[-1]["budget"] >= 1.0:  # the quality floor held, the distribution did not
        raise ConfigError(
            f"cache: no schedule keeps the distribution (shift <= {config.max_fd_shift:g}) below the original's"
            f" FLOPs (best {min(r['fd_shift'] for r in checked):.3g})"
        )
    raise ConfigError(
        f"cache: no schedule keeps min_psnr_db {config.min_psnr_db:g} dB on the calibration seeds below the"
        f" original's FLOPs (best {max(p for p, _ in scored):.2f} dB)"
    )


def _candidates(
    costs: dict[tuple[int, int], tuple[int, list[list[float]]]],
    criteria: list[str],
    weights: list[int],
    full_flops: int,
    budget: float,
    change: list[float],
    scored: list[tuple[float, Candidate]],
) -> list[Candidate]:
    """Each region's schedule per criterion under `budget` (FLOPs per image) that reuses at least one step,
    less those already scored."""
    seen = {(c.region, c.refresh) for _, c in scored}
    found: dict[tuple, Candidate] = {}
    steps = len(weights)
    for region, (cached_flops, cost) in costs.items():
        for criterion in criteria:
            refresh = _schedule(criterion, cost, weights, full_flops, cached_flops, budget, change)
            if refresh is None or len(refresh) == steps or (region, refresh) in seen or (region, refresh) in found:
                continue
            flops = sum(w * (full_flops if i in refresh else cached_flops) for i, w in enumerate(weights))
            error = sum(cost[_last(refresh, i)][i] for i in range(steps) if i not in refresh)
            found[region, refresh] = Candidate(criterion, region, refresh, error, flops)
    return list(found.values())


def admissible_regions(program: DiffusionProgram) -> list[tuple[int, int]]:
    n = levels(program)
    if reuses_blocks(program.spec.family):
        return [(a, b) for a in range(n) for b in range(a + 1, n + 1)]
    return [(first, n) for first in range(1, n)]


def _with_cache(plan: SamplingPlan, program: DiffusionProgram, c: Candidate) -> SamplingPlan:
    refresh = tuple(i in c.refresh for i in range(model_calls(plan)))
    return dataclasses.replace(plan, cache=CacheSchedule(program.spec.family, c.region, refresh))


def _last(refresh: tuple[int, ...], step: int) -> int:
    return max(j for j in refresh if j <= step)


def _traces(program: DiffusionProgram, ctx: Context, probe: int) -> list[list[torch.Tensor]]:
    """Per step, the traced activations on the reference's inputs for the probe rows: the first
    `probe` samples' cond rows, then (under guidance) their uncond rows."""
    traj = ctx.calibration
    n = len(traj.seeds)
    probe = min(probe, n)
    rows = list(range(probe)) + ([n + i for i in range(probe)] if traj.x.shape[1] == 2 * n else [])
    cond = take(traj.cond, rows)
    return [trace(program, traj.x[s][rows], traj.t[s].expand(len(rows)), cond) for s in range(traj.steps)]


def _reuse_costs(
    traces: list, family: str, region: tuple[int, int], plan: SamplingPlan, guided: bool, probe: int
) -> list[list[float]]:
    """cost[j][i]: mean relative error at the region exit when step i reuses step j's stored tensor."""
    feats = [region_tensors(family, traced, region) for traced in traces]
    steps = len(feats)
    cost = [[0.0] * steps for _ in range(steps)]
    for i in range(steps):
        stored_i, exit_i = feats[i]
        use_cfg = guided and plan.guided(i)
        rows = slice(None) if use_cfg or not guided else slice(0, min(probe, stored_i.shape[0]))
        exit_norm = exit_i[rows].flatten(1).norm(dim=1).clamp_min(1e-12)
        for j in range(i):
            if use_cfg and not plan.guided(j):
                cost[j][i] = math.inf  # a guided step cannot reuse an unguided step's tensor
                continue
            diff = (feats[j][0][rows] - stored_i[rows]).flatten(1).norm(dim=1)
            cost[j][i] = float((diff / exit_norm).mean())
    return cost


def _first_block_change(traces: list, plan: SamplingPlan, guided: bool, probe: int) -> list[float]:
    """TeaCache / first-block cache indicator: relative L1 change of the first block's residual
    from step i - 1 to step i (DiT)."""
    change = [0.0]
    for i in range(1, len(traces)):
        rows = slice(None) if guided and plan.guided(i) else slice(0, probe)
        now = (traces[i][1] - traces[i][0])[rows]
        then = (traces[i - 1][1] - traces[i - 1][0])[rows]
        change.append(float(((now - then).abs().flatten(1).mean(1) / then.abs().flatten(1).mean(1)).mean()))
    return change


def _schedule(
    criterion: str,
    cost: list[list[float]],
    weights: list[int],
    full: int,
    cached: int,
    budget: float,
    change: list[float],
) -> tuple[int, ...] | None:
    """Refresh steps (always including 0) within the budget, or None when none fits."""
    steps = len(weights)
    if full <= cached:
        return None
    # FLOPs = sum(w * cached) + sum over refresh steps of w * (full - cached) <= budget
    capacity = math.floor((budget - sum(weights) * cached) / (full - cached) + 1e-9)
    if capacity < weights[0]:
        return None
    if criterion == "similarity":
        error, refresh = best_refresh(cost, weights, capacity)
        return refresh if math.isfinite(error) else None
    if criterion == "uniform":
        for every in range(1, steps + 1):
            refresh = tuple(range(0, steps, every))
            if sum(weights[i] for i in refresh) <= capacity and all(
                math.isfinite(cost[_last(refresh, i)][i]) for i in range(steps) if i not in refresh
            ):
                return refresh
        return None
    return _first_block(change, cost, weights, capacity)


def best_refresh(cost: list[list[float]], weights: list[int], capacity: int) -> tuple[float, tuple[int, ...]]:
    """Exact minimum of sum_i cost[last refresh <= i][i] over refresh sets containing step 0 whose
    summed weights fit `capacity`."""
    steps = len(weights)

    @cache
    def from_step(j: int, room: int) -> tuple[float, tuple[int, ...]]:
        if room < weights[j]:
            return (math.inf, ())
        best: tuple[float, tuple[int, ...]] = (math.inf, ())
        segment = 0.0
        for k in range(j + 1, steps + 1):
            option: tuple[float, tuple[int, ...]]
            if k == steps:
                option = (segment, (j,))
            else:
                rest = from_step(k, room - weights[j])
                option = (segment + rest[0], (j, *rest[1]))
            best = min(best, option)
            if k < steps:
                segment += cost[j][k]
        return best

    return from_step(0, capacity)


def _first_block(
    change: list[float], cost: list[list[float]], weights: list[int], capacity: int
) -> tuple[int, ...] | None:
    """TeaCache-style: refresh once the first block's accumulated change since the last refresh
    reaches a threshold; the smallest threshold whose schedule fits the budget."""
    steps = len(weights)

    def schedule(threshold: float) -> tuple[int, ...]:
        refresh, acc = [0], 0.0
        for i in range(1, steps):
            acc += change[i]
            if acc >= threshold:
                refresh.append(i)
                acc = 0.0
        return tuple(refresh)

    for threshold in sorted({0.0, *(sum(change[a:b]) for a in range(steps) for b in range(a + 1, steps + 1))}):
        refresh = schedule(threshold + 1e-12)
        if sum(weights[i] for i in refresh) <= capacity and all(
            math.isfinite(cost[_last(refresh, i)][i]) for i in range(steps) if i not in refresh
        ):
            return refresh
    return None


PASS = Pass(
    name="cache",
    phase=Phase.REUSE_POLICY,
    config=Config,
    run=run,
    invalidates=frozenset({FLOPS}),
    check=check,
    check_program=check_program,
)
