"""Depth pruning: remove whole blocks of a family's block stack (its adapter's `block_stack`: DiT, PixArt).

LAPTOP-Diff's one-shot criterion: each block's removal is scored alone by the distortion of the
model output it causes, ||f_without_b(x) - f(x)||^2 / ||f(x)||^2 on calibration inputs stratified
over the plan's timesteps; the scores are taken as additive and the lowest-scoring blocks go: `blocks`
of them, a `fraction` of the stack, or as many as keep the summed score under `max_distortion`. `last`
(drop the last N blocks) is the naive baseline. The blocks are removed physically (the ModuleList shrinks).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from calibration.sensitivity import output_distortions
from core.adapters import adapter_for, adapters, denoiser_module, parameter_count, respec
from core.adapters.base import Adapter
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from passes.analyses import FLOPS
from passes.base import Context, Pass, PassResult, Phase

CRITERIA = ("distortion", "last")


@dataclass
class Config:
    blocks: int = 2  # blocks to remove; 0 = as many as max_distortion allows
    fraction: float = 0.0  # > 0: remove floor(fraction x the stack's depth) blocks instead of `blocks`
    max_distortion: float = 0.0  # with blocks = 0: bound on the summed one-shot distortion
    criterion: str = "distortion"
    samples: int = 256  # timestep-stratified calibration inputs
    batch: int = 64


@dataclass(frozen=True)
class LayerRemovalDecision(Decision):
    skipped: str | None = None  # why nothing was removed (a family without removable blocks)
    criterion: str = ""
    removed: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # original index of each remaining block
    distortion_by_block: list[float] | None = None
    parameters_before: int = 0
    parameters_after: int = 0

    title = "Layer removal"

    def markdown(self) -> list[str]:
        if self.skipped:
            return [f"- not applied: {self.skipped}"]
        lines = [
            f"- removed blocks {self.removed} by `{self.criterion}`; parameters {self.parameters_before:,} ->"
            f" {self.parameters_after:,}"
        ]
        if self.distortion_by_block:
            scores = ", ".join(f"{i}: {s:.4g}" for i, s in enumerate(self.distortion_by_block))
            lines.append(f"- one-shot output distortion of removing each block alone: {scores}")
        return lines


def check(config: Config, capabilities: frozenset[str]) -> None:
    if config.criterion not in CRITERIA:
        raise ConfigError(f"layer_removal: unknown criterion '{config.criterion}' (known: {', '.join(CRITERIA)})")
    if config.blocks < 0 or config.max_distortion < 0:
        raise ConfigError("layer_removal: blocks and max_distortion must be >= 0")
    if not 0 <= config.fraction < 1:
        raise ConfigError(f"layer_removal: fraction must be in [0, 1), got {config.fraction}")
    if config.blocks == 0 and config.max_distortion == 0 and config.fraction == 0:
        raise ConfigError("layer_removal: set blocks (a count), fraction (of the stack) or max_distortion (a budget)")
    if not (1 <= config.samples <= MAX_INPUTS and 1 <= config.batch <= MAX_INPUTS):
        raise ConfigError(f"layer_removal: samples and batch must be in [1, {MAX_INPUTS}]")


def _count(config: Config, depth: int) -> int:
    """Blocks to remove from a stack of `depth` (0: by the distortion budget)."""
    return int(config.fraction * depth) if config.fraction else config.blocks


def _stacked(adapter: Adapter) -> bool:
    return adapter.block_stack is not None


def _level_only(adapter: Adapter) -> bool:
    """A family whose blocks are all levels of a UNet (channel layout, each changing resolution or width):
    nothing to remove, width pruning applies; a target's recipe serves every family, so the pass says so
    instead of refusing."""
    return adapter.block_stack is None and adapter.block_layout == "channels"


def check_program(config: Config, program: DiffusionProgram) -> None:
    depth, family = len(program.spec.blocks), program.spec.family
    adapter = adapter_for(program.spec.model_class)
    if not (_stacked(adapter) or _level_only(adapter)):
        stacks = ", ".join(sorted(a.family for a in adapters().values() if _stacked(a)))
        raise ConfigError(f"layer_removal: not implemented for the {family} family (block stacks: {stacks})")
    if not _stacked(adapter):
        return
    if config.fraction and _count(config, depth) == 0:
        raise ConfigError(f"layer_removal: fraction {config.fraction} of {depth} blocks removes none")
    if _count(config, depth) >= depth:
        raise ConfigError(f"layer_removal: cannot remove {_count(config, depth)} of {depth} blocks")


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    adapter = adapter_for(program.spec.model_class)
    if not _stacked(adapter):  # a target's recipe serves every family: say so in the report
        skipped = (
            f"a {program.spec.family} has no transformer blocks to remove (its blocks change resolution or "
            "channel count); width pruning (prune) applies"
        )
        return PassResult(program.replace(), LayerRemovalDecision(skipped=skipped))
    model = copy.deepcopy(program.denoiser).eval()
    count = len(adapter.blocks(model))
    blocks = _count(config, count)
    if blocks >= count:
        raise ConfigError(f"layer_removal: cannot remove {blocks} of {count} blocks")
    scores = _distortions(program, adapter, model, config, ctx) if config.criterion == "distortion" else None
    if scores is None:
        removed = list(range(count - blocks, count))
    else:
        order = sorted(range(count), key=lambda b: scores[b])
        if blocks:
            removed = order[:blocks]
        else:
            removed, total = [], 0.0
            for b in order[: count - 1]:
                if total + scores[b] > config.max_distortion:
                    break
                removed.append(b)
                total += scores[b]
    if not removed:
        raise ConfigError(f"layer_removal: no block fits max_distortion {config.max_distortion}")
    kept = [b for b in range(count) if b not in removed]
    stack = adapter.blocks(model)
    adapter.set_blocks(model, nn.ModuleList(stack[b] for b in kept))
    decision = LayerRemovalDecision(
        criterion=config.criterion,
        removed=sorted(removed),
        kept=kept,
        distortion_by_block=None if scores is None else [round(s, 6) for s in scores],
        parameters_before=parameter_count(program.denoiser),
        parameters_after=parameter_count(model),
    )
    # The lineage goes into the spec: recovery pairs each surviving block with its original.
    origin = program.spec.origins()
    return PassResult(respec(program, model, tuple(origin[b] for b in kept)), decision)


def _distortions(
    program: DiffusionProgram, adapter: Adapter, model: nn.Module, config: Config, ctx: Context
) -> list[float]:
    """One-shot output distortion of removing each block alone."""
    blocks, stack = adapter.blocks(model), adapter.block_stack
    assert stack is not None  # a stacked family (run() checked)

    @contextlib.contextmanager
    def without(b: int) -> Iterator[None]:
        setattr(model, stack, nn.ModuleList(blk for i, blk in enumerate(blocks) if i != b))
        try:
            yield
        finally:
            setattr(model, stack, blocks)

    module = denoiser_module(program.replace(denoiser=model))
    edits = [functools.partial(without, b) for b in range(len(blocks))]
    desc = "layer_removal: scoring blocks"
    return output_distortions(module, ctx.calibration, config.samples, config.batch, ctx.rng, edits, ctx.progress, desc)


PASS = Pass(
    name="layer_removal",
    phase=Phase.STRUCTURE,
    config=Config,
    run=run,
    invalidates=frozenset({FLOPS}),
    check=check,
    check_program=check_program,
)
