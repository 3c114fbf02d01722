"""What a job is asked to do (the command line's options) and what it checked before any work."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from calibration.capture import Trajectories
from core.ir import DiffusionProgram
from core.placement import Placement
from passes.manager import PlannedPass
from verify.gates import GatePlan
from verify.judges import JudgeOptions, JudgePlan

Progress = Callable[..., Iterable]


@dataclass
class JobOptions:
    target: str = "cpu-fp32"
    out: Path = Path("optimized")
    samples: int = 100
    seed_sets: int = 4  # most disjoint evaluation sets a distribution gate is judged on (verify.seed_sets)
    calibration_samples: int = 20
    seed: int = 0
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    gates: dict[str, float] = field(default_factory=dict)
    calibration: Path | None = None
    overwrite: bool = False
    latency_repeats: int = 20
    allow_large: bool = False  # skip the memory estimate's refusal (the deliberately huge)
    prompts: Path | None = None  # a text-to-image model's prompt set (default: its folder's prompts.txt)
    variant: str | None = None  # a diffusers folder's weight variant (default: its plain files, or its only one)
    config: Path | None = None  # a single-file checkpoint's family as a local diffusers folder
    placement: Placement = field(default_factory=Placement)  # --device / --dtype of the torch side
    # Search targets (`*-auto`): continue an interrupted search, processes running trials, shared storage,
    # and trials only (a worker of a shared study: no output, no finalists).
    resume: bool = False
    workers: int = 1
    storage: str | None = None
    trials_only: bool = False
    judges: JudgeOptions = field(default_factory=JudgeOptions)  # user-supplied feature models (--clip, --inception)


class Loaded(NamedTuple):
    """What the job checked before any work: the program, its recipes, the --calibration trajectories,
    the judges that apply to the model and, from them, the gates that can be measured."""

    program: DiffusionProgram
    recipes: list[list[PlannedPass]]
    given: Trajectories | None
    judges: JudgePlan
    gates: GatePlan
