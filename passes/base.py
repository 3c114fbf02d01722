"""The pass contract: a pass is data (name, phase, requires, invalidates, Config) plus `run`.

Models: torch.fx's PassBase/PassManager (a pass returns a new program; the manager checks and
orders), LLVM's new pass manager (analyses computed on demand, cached, and dropped when a pass
says it invalidated them) and torchao's config + handler (a typed Config per pass).

A pass module defines `PASS = Pass(...)`; `passes.manager` finds it by scanning this package, so
adding a pass is one new file. A pass never imports another pass: what one pass leaves for a later
one lives in the program (the spec's block lineage, the plan), never in a side channel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import torch

from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram
from core.limits import MAX_INPUTS
from passes.analyses import ANALYSES, Analyses

if TYPE_CHECKING:
    from calibration.capture import Trajectories
    from verify.floor_check import FloorCheck


class Phase(IntEnum):
    """When a pass runs. The manager runs a recipe phase by phase (recipe order within a phase)."""

    PLAN = 1  # the loop itself: scheduler and step count (sampler)
    STRUCTURE = 2  # which blocks, heads and channels exist (layer_removal, prune)
    RECOVERY = 3  # weights retrained toward the original (recover)
    DISTILLATION = 4  # fewer network evaluations learned from the network (guidance/progressive distillation)
    NUMERICS = 5  # number formats (quantize)
    GUIDANCE_POLICY = 6  # which steps run the unconditional pass (guidance)
    REUSE_POLICY = 7  # which steps recompute which features (cache): priced on everything before it


C = TypeVar("C")


class PassResult(NamedTuple):
    """What `run` returns: a new program (the input is left untouched) and the typed decision."""

    program: DiffusionProgram
    decision: Decision


@dataclass
class Context:
    """What a pass may use besides its program and Config."""

    reference: DiffusionProgram  # the original network under the current loop (no guidance/cache policy)
    analyses: Analyses
    capabilities: frozenset[str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rng: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    seed: int = 0  # the run's --seed: offsets the passes' own seed families (core.seeds)
    progress: Callable[..., Iterable] = lambda it, **_: it
    origin: DiffusionProgram | None = None  # the reference before any pass changed the loop (set by the manager)

    @property
    def calibration(self) -> Trajectories:
        """The reference's trajectories on the calibration seeds, recaptured when a pass changed the loop."""
        return self.analyses.calibration(self.reference)

    def flops(self, program: DiffusionProgram) -> dict[str, Any]:
        return self.analyses.flops(program)

    def distribution_check(self, samples: int) -> FloorCheck:
        """The original's distribution check (verify.floor_check), before any pass changed the loop."""
        return self.analyses.distribution_check(self.origin or self.reference, samples, self.seed, self.progress)


@dataclass(frozen=True)
class Pass(Generic[C]):
    name: str
    phase: Phase
    config: type[C]  # a dataclass with typed fields and defaults; the recipe's "config" fills it
    run: Callable[[DiffusionProgram, C, Context], PassResult]
    requires: frozenset[str] = frozenset()  # target capabilities, e.g. {"int8"}
    invalidates: frozenset[str] = frozenset()  # analyses (ANALYSES) its output makes stale
    needs_earlier: frozenset[Phase] = frozenset()  # phases the recipe must also contain, before this one
    # The output replaces the reference for the passes after it (a distilled student: later passes
    # preserve the student's behaviour, not the teacher's on the student's loop).
    new_reference: bool = False
    # Integer config fields that set how much training the pass does (e.g. steps): a search's cheap
    # trials scale them down, its finalists run them as written.
    budgets: frozenset[str] = frozenset()
    check: Callable[[C, frozenset[str]], None] | None = None  # config vs target, before anything runs
    check_program: Callable[[C, DiffusionProgram], None] | None = None  # config vs the model, ditto
    doc: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.invalidates) - set(ANALYSES)
        if unknown:
            raise ValueError(f"pass '{self.name}' invalidates unknown analyses {sorted(unknown)}")


def check_distribution_options(name: str, bound: float, check_samples: int, option: str = "max_fd_shift") -> None:
    """The options of a pass's distribution check (Context.distribution_check): a bound, its sample count."""
    if not 0.0 <= bound <= 100.0:
        raise ConfigError(f"{name}: {option} must be in [0, 100] (0: no distribution check)")
    if not 4 <= check_samples <= MAX_INPUTS:
        raise ConfigError(f"{name}: check_samples must be in [4, {MAX_INPUTS}]")
