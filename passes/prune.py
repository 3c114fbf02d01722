"""Width pruning: remove attention heads and MLP hidden units (DiT, the action transformer) or residual
blocks' inner channels (UNet, LeRobot's 1-D UNet), as each family's adapter lists them (prunable_units).

The network is made physically smaller (core.surgery): the same fraction of units goes in every
layer, so shapes stay uniform. Units are ranked by an importance accumulated over the plan's own
timesteps (calibration inputs stratified over the steps, see calibration.selection):
- `taylor` (Diff-Pruning): sum of |w * dL/dw| over a unit's weights, L the denoising loss on the
  model's own calibration samples re-noised at every plan timestep (no training data needed);
- `distortion`: the energy of a unit's contribution to its layer's output on the calibration inputs
  (exact for heads and MLP units; for conv channels, per-channel input energy times weight norm);
- `magnitude`: the squared norm of a unit's weights, the naive baseline.
Channels go in whole GroupNorm groups, so the kept channels' normalization is unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from calibration import selection
from core import surgery
from core.adapters import adapter_for, adapters, denoiser_module, parameter_count, respec
from core.adapters.base import CHANNELS, CROSS_HEADS, HEADS, MLP
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from core.noising import add_noise, training_target
from core.schedulers import build_scheduler
from passes.analyses import FLOPS
from passes.base import Context, Pass, PassResult, Phase

CRITERIA = ("taylor", "distortion", "magnitude")
FIELDS = (HEADS, CROSS_HEADS, MLP, CHANNELS)  # a config field per unit kind (the adapter's `prunable`)


@dataclass
class Config:
    # A family reads the fields of the unit kinds its adapter lists as prunable: transformer blocks (DiT,
    # PixArt, an SD UNet's attention blocks, the action transformer) `heads`, `cross_heads` and `mlp`;
    # residual blocks (UNet, SD UNet, LeRobot's 1-D UNet) `channels`.
    heads: float = 0.0  # fraction of self-attention heads removed in every transformer block
    cross_heads: float = 0.0  # fraction of cross-attention (prompt) heads removed in every transformer block
    mlp: float = 0.25  # fraction of MLP hidden units removed in every transformer block
    channels: float = 0.25  # fraction of inner channels (whole groups) removed in every residual block
    criterion: str = "taylor"
    samples: int = 256  # timestep-stratified calibration inputs that score the units
    batch: int = 64


@dataclass(frozen=True)
class PruneDecision(Decision):
    criterion: str
    fractions: dict[str, float]
    removed: dict[str, list[int]]  # per layer group: the unit indices removed
    parameters_before: int
    parameters_after: int

    title = "Width pruning"

    def markdown(self) -> list[str]:
        fractions = ", ".join(f"{k} {v:g}" for k, v in self.fractions.items() if v)
        return [
            f"- criterion `{self.criterion}`; removed per layer: {fractions}; parameters {self.parameters_before:,}"
            f" -> {self.parameters_after:,}"
        ]


def check(config: Config, capabilities: frozenset[str]) -> None:
    for name in FIELDS:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ConfigError(f"prune: {name} is a fraction of units to remove, in [0, 1)")
    if config.criterion not in CRITERIA:
        raise ConfigError(f"prune: unknown criterion '{config.criterion}' (known: {', '.join(CRITERIA)})")
    if not (1 <= config.samples <= MAX_INPUTS and 1 <= config.batch <= MAX_INPUTS):
        raise ConfigError(f"prune: samples and batch must be in [1, {MAX_INPUTS}]")


@dataclass
class Group:
    """Units of one layer that are kept or removed together, and how to score and remove them."""

    name: str
    units: int
    remove: int
    size: int  # each unit is `size` consecutive rows/columns of every weight in `weights`
    weights: list[tuple[nn.Parameter, int]]  # (weight, the dimension that indexes units)
    output_site: nn.Module  # the layer that consumes the units (its input is the units' activations)
    contribution: Callable[[torch.Tensor], torch.Tensor]  # that input -> energy per unit
    apply: Callable[[list[int]], None]


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    model = copy.deepcopy(program.denoiser).eval()
    kinds = _kinds(program)
    groups = list(_groups(program, model, config))
    if not any(g.remove for g in groups):
        fields = " / ".join(kinds)
        raise ConfigError(f"prune: nothing to remove: with these {fields} fractions every layer keeps all its units")
    scores = _scores(program, model, groups, config, ctx)
    removed = {}
    for g, s in zip(groups, scores, strict=True):
        keep = sorted(torch.argsort(s, descending=True)[: g.units - g.remove].tolist())
        g.apply(keep)
        removed[g.name] = sorted(set(range(g.units)) - set(keep))
    before = parameter_count(program.denoiser)
    after = parameter_count(model)
    pruned = respec(program, model)
    fractions = {k: getattr(config, k) for k in kinds}
    decision = PruneDecision(config.criterion, fractions, removed, before, after)
    return PassResult(pruned, decision)


def _kinds(program: DiffusionProgram) -> tuple[str, ...]:
    kinds = adapter_for(program.spec.model_class).prunable
    if not kinds:
        supported = sorted({a.family for a in adapters().values() if a.prunable})
        raise ConfigError(
            f"prune: no pruning rules for the {program.spec.family} family (supported: {', '.join(supported)})"
        )
    return kinds


def _groups(program: DiffusionProgram, model: nn.Module, config: Config) -> Iterator[Group]:
    """A group per prunable site the family's adapter lists, of the kinds this config removes."""
    build: dict[str, Callable[[str, Any, float], Group]] = {
        HEADS: _head_group,
        CROSS_HEADS: _head_group,
        MLP: _mlp_group,
        CHANNELS: _channel_group,
    }
    for name, kind, site in adapter_for(program.spec.model_class).prunable_units(model):
        if getattr(config, kind):
            yield build[kind](name, site, getattr(config, kind))


def _count(units: int, fraction: float) -> int:
    return min(units - 1, round(units * fraction))


def _head_group(name: str, attn: nn.Module, fraction: float) -> Group:
    heads, size = attn.heads, attn.inner_dim // attn.heads

    def rows(h: int) -> torch.Tensor:
        return torch.arange(h * size, (h + 1) * size)

    def contribution(x: torch.Tensor) -> torch.Tensor:  # x: [B, N, heads * size], to_out's input
        w = attn.to_out[0].weight.detach()
        parts = x.unflatten(-1, (heads, size))
        return torch.stack([(parts[..., h, :] @ w[:, rows(h)].T).square().sum() for h in range(heads)])

    return Group(
        name, heads, _count(heads, fraction), size,
        [(attn.to_q.weight, 0), (attn.to_k.weight, 0), (attn.to_v.weight, 0), (attn.to_out[0].weight, 1)],
        attn.to_out[0], contribution,
        lambda keep: surgery.prune_heads(attn, keep),
    )  # fmt: skip


def _mlp_group(name: str, site: surgery.MlpSite, fraction: float) -> Group:
    up, down = site.up, site.down

    def contribution(h: torch.Tensor) -> torch.Tensor:  # h: [B, N, units], down's input
        return h.flatten(0, -2).square().sum(0) * down.weight.detach().square().sum(0)

    return Group(
        name, down.in_features, _count(down.in_features, fraction), 1, [(up.weight, 0), (down.weight, 1)],
        down, contribution,
        lambda keep: surgery.prune_mlp(site, keep),
    )  # fmt: skip


def _channel_group(name: str, site: surgery.ChannelSite, fraction: float) -> Group:
    norm, conv2 = site.norm, site.conv2
    groups, size = norm.num_groups, norm.num_channels // norm.num_groups

    def contribution(a: torch.Tensor) -> torch.Tensor:  # a: [B, C, *positions], conv2's input
        per_channel = lambda w: w.square().transpose(0, 1).flatten(1).sum(1)  # noqa: E731
        energy = per_channel(a) * per_channel(conv2.weight.detach())
        return energy.unflatten(0, (groups, size)).sum(1)

    return Group(
        name, groups, _count(groups, fraction), size, [(site.conv1.weight, 0), (conv2.weight, 1)],
        conv2, contribution,
        lambda keep: surgery.prune_channels(site, keep),
    )  # fmt: skip


def _scores(
    program: DiffusionProgram, model: nn.Module, groups: list[Group], config: Config, ctx: Context
) -> list[torch.Tensor]:
    if config.criterion == "magnitude":
        return [_per_unit(g, lambda p: p.detach().square()) for g in groups]
    inputs = selection.select(ctx.calibration, "timestep", config.samples, ctx.rng)
    module = denoiser_module(program.replace(denoiser=model))
    if config.criterion == "distortion":
        totals = [torch.zeros(g.units) for g in groups]

        def hook(i: int):
            def record(_module, args):
                totals[i] += groups[i].contribution(args[0].detach())

            return record

        handles = [g.output_site.register_forward_pre_hook(hook(i)) for i, g in enumerate(groups)]
        try:
            with torch.no_grad():
                for x, t, y in ctx.progress(list(inputs.batches(config.batch)), desc="prune: scoring", leave=False):
                    module.apply(x, t, y)
        finally:
            for h in handles:
                h.remove()
        return totals
    # taylor: the denoising loss on the model's own samples, re-noised at the plan's timesteps
    scheduler = build_scheduler(program.plan)
    finals = ctx.calibration.final
    totals = [torch.zeros(g.units) for g in groups]
    for p in model.parameters():
        p.requires_grad_(True)
    for x, t, y in ctx.progress(list(inputs.batches(config.batch)), desc="prune: scoring", leave=False):
        x0 = finals[torch.randint(len(finals), (x.shape[0],), generator=ctx.rng)]
        noise = torch.randn(x0.shape, generator=ctx.rng)
        noisy = add_noise(scheduler, x0, noise, t)
        target = training_target(scheduler, program.spec.prediction_type, x0, noise, t)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(module.apply(noisy, t, y), target).backward()
        for i, g in enumerate(groups):
            totals[i] += _per_unit(g, lambda p: (p * p.grad).detach().abs())
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return totals


def _per_unit(group: Group, elementwise: Callable[[nn.Parameter], torch.Tensor]) -> torch.Tensor:
    """Sum an elementwise score over each unit's rows/columns of every weight of the group."""
    total = torch.zeros(group.units)
    for weight, dim in group.weights:
        score = elementwise(weight).transpose(0, dim).flatten(1).sum(1)  # per row/column along `dim`
        # A weight may hold the units more than once along `dim` (GEGLU's value and gate halves).
        total += score.unflatten(0, (-1, group.units, group.size)).sum((0, 2))
    return total


def check_program(config: Config, program: DiffusionProgram) -> None:
    _kinds(program)


PASS = Pass(
    name="prune",
    phase=Phase.STRUCTURE,
    config=Config,
    run=run,
    invalidates=frozenset({FLOPS}),
    check=check,
    check_program=check_program,
)
