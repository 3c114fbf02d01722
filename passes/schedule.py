"""Training-free step reduction: search the timesteps and the solver for N steps (loop level).

For each solver (DDIM, DPM-Solver++(2M), UniPC, Euler: diffusers schedulers run on a custom grid,
core.schedulers.GRID_SOLVERS) the N timesteps are optimized so the N-step loop's final samples match
the original loop's on the calibration seeds, as Align-Your-Steps (Sabour et al. 2024) and
DM-NonUniform (Xue et al. 2024) fit a schedule to the model rather than space it uniformly. The
objective is the mean PSNR of final samples vs the original loop's (same seeds, conditions and
guidance); the optimizer is coordinate descent on the timesteps with a shrinking move, which needs
only loop runs (no gradients). The pass reports the uniform grid (the plan's own spacing) of each
solver beside its searched one, and keeps the best pair.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram, SamplingPlan
from core.limits import MAX_STEPS
from core.schedulers import FLOW_GRID_SOLVERS, GRID_SOLVERS, build_scheduler, check_plan, is_flow, on_grid
from core.variants import torch_loop
from passes.analyses import CALIBRATION, FLOPS
from passes.base import Context, Pass, PassResult, Phase
from verify.fidelity import replay_psnr


@dataclass
class Config:
    sampling_steps: int = 4  # N: network calls per sample (twice that under classifier-free guidance)
    # `steps` counts training steps in every pass; this pass's loop step count is `sampling_steps` (issue 34).
    RENAMED: ClassVar[dict[str, str]] = {"steps": "sampling_steps"}
    solvers: list = field(default_factory=list)  # [] = every grid solver for the model's schedule
    sweeps: int = 4  # coordinate-descent sweeps over the timesteps (the move halves each sweep)
    max_seconds: float = 300.0


@dataclass(frozen=True)
class ScheduleDecision(Decision):
    sampling_steps: int
    solver: str
    timesteps: list[float]
    tried: list[dict]  # per solver: uniform and searched calibration PSNR, searched grid
    evaluations: int
    seconds: float

    title = "Schedule search"

    def markdown(self) -> list[str]:
        lines = [
            f"{self.sampling_steps} steps; kept `{self.solver}` on timesteps {[round(t) for t in self.timesteps]}"
            f" ({self.evaluations} loop runs on the calibration seeds, {self.seconds} s).",
            "",
            "| solver | uniform grid PSNR (dB) | searched grid PSNR (dB) | searched timesteps |",
            "|---|---|---|---|",
        ]
        for row in self.tried:
            grid = [round(t) for t in row["timesteps"]]
            lines.append(f"| {row['solver']} | {row['uniform_psnr_db']:.2f} | {row['searched_psnr_db']:.2f} | {grid} |")
        return lines


def check(config: Config, capabilities: frozenset[str]) -> None:
    if not 1 <= config.sampling_steps <= MAX_STEPS:
        raise ConfigError(f"schedule: sampling_steps must be in [1, {MAX_STEPS}]")
    if not all(isinstance(s, str) for s in config.solvers):
        raise ConfigError("schedule: solvers must be a list of solver names")
    if not 0 <= config.sweeps <= 50 or config.max_seconds <= 0:
        raise ConfigError("schedule: sweeps must be in [0, 50] and max_seconds > 0")


def _solvers(config: Config, program: DiffusionProgram) -> list[str]:
    table = FLOW_GRID_SOLVERS if is_flow(program.plan) else GRID_SOLVERS
    return list(config.solvers or table)


def check_program(config: Config, program: DiffusionProgram) -> None:
    table = FLOW_GRID_SOLVERS if is_flow(program.plan) else GRID_SOLVERS
    unknown = [s for s in config.solvers if s not in table]
    if unknown:
        raise ConfigError(f"schedule: unknown solver(s) {unknown} for this model (known: {', '.join(table)})")
    train = build_scheduler(program.plan).config.num_train_timesteps
    if config.sampling_steps >= train:
        raise ConfigError(
            f"schedule: {config.sampling_steps} steps needs more than the scheduler's {train} train timesteps"
        )
    for solver in _solvers(config, program):
        check_plan(on_grid(program.plan, solver, _uniform(program.plan, config.sampling_steps)))


def _uniform(plan: SamplingPlan, steps: int) -> list[float]:
    """The plan's own spacing at `steps` steps: what cutting the steps by hand (`sampler`) gives."""
    scheduler = build_scheduler(dataclasses.replace(plan, num_inference_steps=steps, timesteps=None))
    return list(dict.fromkeys(float(t) for t in scheduler.timesteps))  # a two-call step is one grid point


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    origin = ctx.origin or ctx.reference
    target = ctx.analyses.calibration(origin)
    loop = torch_loop(program.replace(plan=program.plan.without_loop_policy()))
    train = build_scheduler(program.plan).config.num_train_timesteps
    start, evaluations = time.perf_counter(), 0

    def score(solver: str, grid: list[float]) -> float:
        nonlocal evaluations
        evaluations += 1
        plan = on_grid(program.plan.without_loop_policy(), solver, grid)
        value = replay_psnr(program.replace(plan=plan), target, loop)
        return value if value == value else float("-inf")  # NaN (diverged) ranks last

    tried = []
    for solver in ctx.progress(_solvers(config, program), desc="schedule: solvers", leave=False):
        uniform = _uniform(program.plan, config.sampling_steps)
        base = score(solver, uniform)
        grid, best = _search(solver, uniform, base, train, config, score, lambda: time.perf_counter() - start)
        tried.append({"solver": solver, "uniform_psnr_db": base, "searched_psnr_db": best, "timesteps": grid})
    kept = max(tried, key=lambda row: row["searched_psnr_db"])
    plan = on_grid(program.plan.without_loop_policy(), kept["solver"], kept["timesteps"])
    decision = ScheduleDecision(
        config.sampling_steps,
        kept["solver"],
        kept["timesteps"],
        [
            {
                **row,
                "uniform_psnr_db": round(row["uniform_psnr_db"], 3),
                "searched_psnr_db": round(row["searched_psnr_db"], 3),
            }
            for row in tried
        ],
        evaluations,
        round(time.perf_counter() - start, 1),
    )
    return PassResult(program.replace(plan=plan), decision)


def _search(
    solver: str,
    grid: list[float],
    best: float,
    train: int,
    config: Config,
    score: Callable[[str, list[float]], float],
    elapsed: Callable[[], float],
) -> tuple[list[float], float]:
    """Coordinate descent: move one timestep at a time by +-move (keeping the grid strictly
    descending within [0, train - 1]); keep a move that raises the score; halve the move each sweep."""
    grid = list(grid)
    move = train / (2 * len(grid))
    for _ in range(config.sweeps):
        for i in range(len(grid)):
            for direction in (1, -1):
                if elapsed() > config.max_seconds:
                    return grid, best
                candidate = list(grid)
                candidate[i] = round(min(train - 1, max(0.0, grid[i] + direction * move)))
                upper = candidate[i - 1] if i else train
                lower = candidate[i + 1] if i + 1 < len(grid) else -1
                if not lower < candidate[i] < upper or candidate[i] == grid[i]:
                    continue
                value = score(solver, candidate)
                if value > best:
                    grid, best = candidate, value
                    break
        move = max(1.0, move / 2)
    return grid, best


PASS = Pass(
    name="schedule",
    phase=Phase.PLAN,
    config=Config,
    run=run,
    invalidates=frozenset({CALIBRATION, FLOPS}),
    check=check,
    check_program=check_program,
    doc="searched timesteps and solver for N steps (training-free)",
)
