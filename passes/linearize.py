"""Attention linearization: softmax self-attention in chosen transformer blocks replaced by linear
attention (SANA's ReLU kernels / LinFusion's normalized form, optionally LiT's depthwise-conv branch) or
by CLEAR's local window attention (core.attention), then only the replaced layers distilled from the
original, LinFusion-style: each replaced layer's output matched to the original layer's on the same
batch, plus the model output (both normalized by the teacher's energy), on the data-free batches the
recover pass uses (calibration.distill_data). The rest of the network stays frozen.

Which blocks: `sensitivity` (default) replaces each block's attention alone, undistilled, and scores the
one-shot model-output distortion on calibration inputs stratified over the plan's timesteps (as
layer_removal scores blocks); the least sensitive `blocks` (or `fraction` of the stack) are replaced.
`all` replaces every block, `last` the last ones, and `steps: 0` skips distillation: the naive variants,
for comparison (`last` is also what `bench --scale` replays: which blocks does not change the cost).

Under a budget (`min_calibration_psnr_db` > 0): after distillation the loop runs end to end on the
calibration seeds, and while its PSNR vs the reference's samples is under the budget the most sensitive
replaced block (by the one-shot scores) gets its original attention back, one block at a time, each step
measured. Greedy: the count is one that meets the budget, found by measuring, not the largest any choice
could reach (the blocks left replaced are not distilled again). A target sets the budget a little above its
PSNR gate, which is checked on other seeds.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from calibration.distill_data import distill
from calibration.sensitivity import output_distortions
from core.adapters import adapter_for, adapters, denoiser_module, respec
from core.adapters.base import Adapter
from core.attention import FEATURE_MAPS, LinearAttention, LocalAttention
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from core.placement import module_placement
from passes.analyses import FLOPS
from passes.base import Context, Pass, PassResult, Phase
from verify.fidelity import replay_psnr

KINDS = ("linear", "local")
SELECTIONS = ("sensitivity", "all", "last")


@dataclass
class Config:
    kind: str = "linear"
    feature_map: str = "relu"  # linear: relu (SANA) or elu (elu + 1)
    conv: bool = True  # linear: LiT's depthwise 3x3 convolution of V over the token grid
    radius: float = 0.0  # local: window radius in tokens (0: a quarter of the grid's shorter side, >= 1)
    tile: int = 8  # local: queries per tile side (blocked attention)
    blocks: int = 0  # blocks to replace (0: `fraction` of the stack)
    fraction: float = 0.5
    selection: str = "sensitivity"
    steps: int = 300  # distillation steps (0: none, the naive variant)
    batch: int = 32
    lr: float = 1e-3
    feature_weight: float = 1.0  # weight of the replaced layers' output term
    max_seconds: float = 600.0
    samples: int = 2048  # loop inputs in the distillation pool
    teacher_samples: int = 64  # fresh trajectories of the original for distillation
    scoring_samples: int = 128  # calibration inputs for the sensitivity scores
    min_calibration_psnr_db: float = 0.0  # budget: revert the most sensitive blocks until met (0: none)


@dataclass(frozen=True)
class LinearizeDecision(Decision):
    kind: str
    mechanism: str
    replaced: list[int] = field(default_factory=list)
    depth: int = 0  # blocks in the stack
    selection: str = ""
    sensitivity_by_block: list[float] | None = None
    steps: int = 0
    seconds: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    reverted: list[int] = field(default_factory=list)  # blocks given their original attention back
    psnr_budget_db: float = 0.0
    calibration_psnr_db: list[float] = field(default_factory=list)  # after distillation, then per revert

    title = "Attention linearization"

    def markdown(self) -> list[str]:
        lines = [f"- self-attention of blocks {self.replaced} replaced by {self.mechanism} (`{self.selection}`)"]
        if self.sensitivity_by_block:
            scores = ", ".join(f"{i}: {s:.4g}" for i, s in enumerate(self.sensitivity_by_block))
            lines.append(f"- one-shot output distortion of replacing each block's attention alone: {scores}")
        if self.steps:
            lines.append(
                f"- replaced layers distilled for {self.steps} steps in {self.seconds} s; loss "
                f"{self.loss_first} -> {self.loss_last} (model output + replaced layers' outputs)"
            )
        else:
            lines.append("- not distilled (naive variant)")
        if self.psnr_budget_db:
            trail = " -> ".join(f"{p} dB" for p in self.calibration_psnr_db)
            lines.append(
                f"- budget: end-to-end PSNR on the calibration seeds >= {self.psnr_budget_db} dB: {trail}; "
                + (f"blocks {self.reverted} reverted to softmax, most sensitive first" if self.reverted else "met")
            )
        return lines


def check(config: Config, capabilities: frozenset[str]) -> None:
    if config.kind not in KINDS or config.selection not in SELECTIONS or config.feature_map not in FEATURE_MAPS:
        raise ConfigError(
            f"linearize: kind in {KINDS}, selection in {SELECTIONS}, feature_map in {FEATURE_MAPS}; got "
            f"{config.kind!r}, {config.selection!r}, {config.feature_map!r}"
        )
    if config.blocks < 0 or not 0 <= config.fraction <= 1 or config.radius < 0 or config.tile < 1:
        raise ConfigError("linearize: blocks >= 0, fraction in [0, 1], radius >= 0, tile >= 1")
    counts = (config.batch, config.samples, config.teacher_samples + 1, config.scoring_samples)
    if not 0 <= config.steps <= 1_000_000 or config.batch < 2 or not all(1 <= c <= MAX_INPUTS for c in counts):
        raise ConfigError(f"linearize: steps in [0, 1000000], batch >= 2, sample counts in [1, {MAX_INPUTS}]")
    if config.lr <= 0 or config.feature_weight < 0 or config.max_seconds <= 0:
        raise ConfigError("linearize: lr and max_seconds must be > 0, feature_weight >= 0")
    if not 0 <= config.min_calibration_psnr_db <= 200:
        raise ConfigError("linearize: min_calibration_psnr_db in [0, 200] dB (0: no budget)")


def check_program(config: Config, program: DiffusionProgram) -> None:
    adapter = adapter_for(program.spec.model_class)
    if adapter.block_stack is None:
        stacks = ", ".join(sorted(a.family for a in adapters().values() if a.block_stack is not None))
        raise ConfigError(
            f"linearize: replaces the self-attention of transformer blocks ({stacks}), not a {program.spec.family}"
        )
    if _count(config, len(adapter.blocks(program.denoiser))) == 0:
        raise ConfigError("linearize: blocks / fraction select no block")


def _count(config: Config, depth: int) -> int:
    if config.selection == "all":
        return depth
    return min(depth, config.blocks or round(config.fraction * depth))


def _attention(adapter: Adapter, model: nn.Module, block: int) -> nn.Module:
    """The self-attention of block `block` of the family's stack."""
    return getattr(adapter.blocks(model)[block], adapter.self_attention)


def _processor(config: Config, grid: tuple[int, int], attn: nn.Module) -> nn.Module:
    """The replacement processor, placed where the attention's weights are (device and --dtype)."""
    device, dtype = module_placement(attn)
    if config.kind == "linear":
        width = attn.to_v.out_features
        return LinearAttention(grid, config.feature_map, config.conv, width).to(device=device, dtype=dtype)
    radius = config.radius or max(1.0, min(grid) / 4)
    return LocalAttention(grid, radius, config.tile).to(device=device, dtype=dtype)


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    adapter = adapter_for(program.spec.model_class)
    grid = adapter.token_grid(program.denoiser, program.spec.sample_shape)
    student_model = copy.deepcopy(program.denoiser).eval().requires_grad_(False)
    blocks = adapter.blocks(student_model)
    count = _count(config, len(blocks))
    by_sensitivity = config.selection == "sensitivity" and count < len(blocks)
    scores = None
    if by_sensitivity or config.min_calibration_psnr_db:
        scores = _sensitivities(program, student_model, config, grid, ctx)
    if scores is not None and by_sensitivity:
        replaced = sorted(sorted(range(len(blocks)), key=scores.__getitem__)[:count])
    else:
        replaced = list(range(len(blocks) - count, len(blocks)))
    for b in replaced:
        attn = _attention(adapter, student_model, b)
        attn.set_processor(_processor(config, grid, attn))
    mechanism = _describe(_attention(adapter, student_model, replaced[0]).processor)
    decision: dict[str, Any] = dict(
        kind=config.kind, mechanism=mechanism, replaced=replaced, depth=len(blocks), selection=config.selection
    )
    if scores is not None:
        decision["sensitivity_by_block"] = [round(s, 6) for s in scores]
    if config.steps:
        log = _distill(program, student_model, replaced, config, ctx)
        first, last = log.first_last()
        decision.update(steps=log.steps, seconds=log.seconds, loss_first=first, loss_last=last)
    if scores is not None and config.min_calibration_psnr_db:
        decision.update(_within_budget(program, student_model, replaced, scores, config.min_calibration_psnr_db, ctx))
    return PassResult(respec(program, student_model), LinearizeDecision(**decision))


def _within_budget(
    program: DiffusionProgram,
    student_model: nn.Module,
    replaced: list[int],
    scores: list[float],
    budget: float,
    ctx: Context,
) -> dict[str, object]:
    """Give the most sensitive replaced blocks their original attention back until the loop's samples on
    the calibration seeds reach `budget` dB vs the reference's; the decision's fields, `replaced` updated."""
    replaced = list(replaced)
    trail = [replay_psnr(respec(program, student_model), ctx.calibration)]
    reverted = []
    adapter = adapter_for(program.spec.model_class)
    while trail[-1] < budget and len(replaced) > 1:
        block = max(replaced, key=lambda b: scores[b])
        original = copy.deepcopy(_attention(adapter, program.denoiser, block)).requires_grad_(False)
        setattr(adapter.blocks(student_model)[block], adapter.self_attention, original)
        replaced.remove(block)
        reverted.append(block)
        trail.append(replay_psnr(respec(program, student_model), ctx.calibration))
    if trail[-1] < budget:
        raise ConfigError(
            f"linearize: with only block {replaced[0]} replaced the loop reaches {trail[-1]:.2f} dB on the calibration "
            f"seeds, under min_calibration_psnr_db {budget}: lower the budget or distill longer (steps)"
        )
    trail = [round(p, 2) for p in trail]
    return {"replaced": replaced, "reverted": reverted, "psnr_budget_db": budget, "calibration_psnr_db": trail}


def _describe(processor: nn.Module) -> str:
    if isinstance(processor, LocalAttention):
        return f"local attention (CLEAR), radius {processor.radius:g}, {processor.keys_per_query} keys per query"
    conv = " + depthwise conv (LiT)" if processor.conv is not None else ""
    return f"linear attention ({processor.feature_map} kernel){conv}"


def _sensitivities(
    program: DiffusionProgram, model: nn.Module, config: Config, grid: tuple[int, int], ctx: Context
) -> list[float]:
    """One-shot output distortion of replacing each block's attention alone (undistilled)."""

    @contextlib.contextmanager
    def replaced(attn: nn.Module) -> Iterator[None]:
        original = attn.processor
        attn.set_processor(_processor(config, grid, attn))
        try:
            yield
        finally:
            attn.set_processor(original)

    module = denoiser_module(program.replace(denoiser=model))
    adapter = adapter_for(program.spec.model_class)
    edits = [functools.partial(replaced, _attention(adapter, model, b)) for b in range(len(adapter.blocks(model)))]
    desc = "linearize: scoring blocks"
    return output_distortions(module, ctx.calibration, config.scoring_samples, 64, ctx.rng, edits, ctx.progress, desc)


def _distill(program: DiffusionProgram, student_model: nn.Module, replaced: list[int], config: Config, ctx: Context):
    """Train the replaced attention layers (projections and the processor's own weights) only."""
    teacher_program = ctx.reference
    student = denoiser_module(program.replace(denoiser=student_model))
    adapter = adapter_for(program.spec.model_class)
    layers = nn.ModuleList(_attention(adapter, student_model, b) for b in replaced)
    origin = program.spec.origins()
    teacher_blocks = [teacher_program.denoiser.get_submodule(name) for name in teacher_program.spec.blocks]
    pairs = [(layers[i], getattr(teacher_blocks[origin[b]], adapter.self_attention)) for i, b in enumerate(replaced)]
    return distill(
        student,
        layers,
        pairs,
        teacher_program,
        ctx.calibration,
        config,
        ctx.rng,
        ctx.progress,
        "linearize: distilling the replaced layers",
        seed=ctx.seed,
    )


PASS = Pass(
    name="linearize",
    phase=Phase.STRUCTURE,
    config=Config,
    run=run,
    invalidates=frozenset({FLOPS}),
    budgets=frozenset({"steps"}),
    check=check,
    check_program=check_program,
)
