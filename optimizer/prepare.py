"""Everything a job checks and builds before its stages run: the options' bounds, the program with the
command line's sampling options, its recipes (or search space), judges, gates and memory estimate, and the
passes' context."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import torch

from calibration import capture as calib
from calibration.capture import Trajectories
from core import limits
from core.errors import ConfigError
from core.fileio import require_regular_file
from core.footprint import footprint
from core.ir import DiffusionProgram
from core.loading import MAX_GUIDANCE, load_program, place
from core.sampling import uses_guidance
from core.schedulers import check_plan, model_calls, with_scheduler
from core.validate import integer, number
from optimizer.options import JobOptions, Loaded, Progress
from optimizer.targets import Target
from passes.analyses import CALIBRATION
from passes.base import Context
from passes.manager import Analyses, plan_passes
from search.space import SearchSpace
from verify.gates import check_gate_names, plan_gates
from verify.judges import plan_judges

MAX_RECIPES_CHECKED = 10_000


def check_options(opts: JobOptions) -> None:
    """Every number a user can pass, bounded, before anything else runs."""
    integer(opts.samples, "--samples", 2, limits.MAX_SAMPLES)
    integer(opts.seed_sets, "--seed-sets", 1, limits.MAX_SAMPLES)
    integer(opts.calibration_samples, "--calibration-samples", 1, limits.MAX_SAMPLES)
    integer(opts.seed, "--seed", 0, limits.MAX_SEED)
    integer(opts.latency_repeats, "--latency-repeats", 0, limits.MAX_REPEATS)
    if opts.steps is not None:
        integer(opts.steps, "--steps", 1, limits.MAX_STEPS)
    if opts.guidance is not None:
        number(opts.guidance, "--guidance", 0.0, MAX_GUIDANCE)
    check_gate_names(opts.gates, "command line")
    integer(opts.workers, "--workers", 1, limits.MAX_WORKERS)
    for path, what in ((opts.calibration, "calibration file"), (opts.prompts, "prompts file")):
        if path is not None:
            require_regular_file(path, what)
    if opts.trials_only and not opts.storage:
        raise ConfigError("--trials-only contributes to a shared study: give its --storage URL")


def apply_sampling_options(program: DiffusionProgram, opts: JobOptions) -> DiffusionProgram:
    plan = program.plan
    if opts.scheduler:
        plan = with_scheduler(plan, opts.scheduler)
    if opts.steps is not None:
        plan = dataclasses.replace(plan, num_inference_steps=opts.steps)
    if opts.guidance is not None and program.spec.conditioning.embedded_guidance is not None:
        # A guidance-embedded model takes --guidance as diffusers' guidance_scale: the embedding's input.
        conditioning = dataclasses.replace(program.spec.conditioning, embedded_guidance=float(opts.guidance))
        program = program.replace(spec=dataclasses.replace(program.spec, conditioning=conditioning))
    elif opts.guidance is not None:
        if opts.guidance > 1 and not program.spec.conditioning.supports_guidance:
            raise ConfigError("this model has no unconditional branch (null class), so guidance is not possible")
        plan = dataclasses.replace(plan, guidance_scale=float(opts.guidance))
    if plan != program.plan:  # the loaded plan was checked when the model was loaded
        check_plan(plan)
    return program.replace(plan=plan)


def check_job_memory(program: DiffusionProgram, samples: int, allow_large: bool, processes: int = 1) -> None:
    """Refuse a run whose largest batch, `samples` seeds sampled at once, would not fit in memory, in
    each of `processes` (a search's --workers each hold the model and run trials)."""
    spec, plan = program.spec, program.plan
    fp = footprint(spec.model_class, spec.model_config)
    need = limits.job_memory(
        fp,
        spec.sample_shape,
        model_calls(plan),
        uses_guidance(plan, spec.conditioning),
        samples,
    )
    advice = "use fewer --samples / --calibration-samples" + (" or --workers" if processes > 1 else "")
    limits.require_memory(need * processes, "this run", advice, allow_large)
    placement = program.placement
    if placement.device.startswith("cuda"):  # GPU memory too: weights and one batched call in --dtype
        size = placement.torch_dtype.itemsize
        on_device = limits.device_job_memory(fp, size, uses_guidance(plan, spec.conditioning), samples)
        limits.require_device_memory(on_device * processes, placement.device, advice, allow_large)


def load_for_job(
    model_path: Path,
    allow_large: bool,
    prompts: Path | None,
    variant: str | None = None,
    config: Path | None = None,
) -> DiffusionProgram:
    """The program, with its prompt set checked now (every prompt within the text encoder's limit)."""
    from core.prompts import text_adapter
    from core.stages import read_prompts

    given = read_prompts(prompts) if prompts is not None else None
    program = load_program(model_path, allow_large, given, variant, config)
    if program.spec.conditioning.text:
        if not program.stages.prompts:
            raise ConfigError(f"{model_path}: a text-to-image model needs a prompt set: pass --prompts FILE")
        text_adapter(program).tokenize(program.stages, program.stages.prompts)
    elif prompts is not None:
        raise ConfigError(f"--prompts: {model_path} is not text-conditioned ({program.spec.conditioning.kind})")
    return program


def load_checked(model_path: Path, target: Target, opts: JobOptions) -> Loaded:
    """The program with the command line's sampling options, its recipes (or search space) checked
    against it, the judges and gates that apply to it, the memory estimate checked, and the --calibration
    trajectories if given (every rank and search worker the same)."""
    from core.environments.observations import attach

    loaded = load_for_job(model_path, opts.allow_large, opts.prompts, opts.variant, opts.config)
    program = attach(
        apply_sampling_options(place(loaded, opts.placement), opts), opts.judges.environment, str(model_path)
    )
    space, _ = target.space_for(program)
    if space is not None:
        check_space(space, program, target.capabilities)
    recipes = [plan_passes(recipe, target.capabilities, program=program) for recipe in target.recipes]
    # The largest batch is the verification set or the calibration set, each sampled at once.
    workers = opts.workers if target.search is not None else 1
    check_job_memory(program, max(opts.samples, opts.calibration_samples), opts.allow_large, workers)
    judges = plan_judges(program, opts.judges)
    gates = plan_gates({**target.gates, **opts.gates}, judges, explicit=opts.gates)
    given = calib.load(opts.calibration, program) if opts.calibration is not None else None
    return Loaded(program, recipes, given, judges, gates)


def pass_context(
    program: DiffusionProgram,
    target: Target,
    opts: JobOptions,
    calibration: Trajectories,
    progress: Progress,
    log: Callable[[str], None],
) -> Context:
    """The passes' context: `program` as the reference, its calibration, the target's capabilities."""
    # A pass that changes the loop invalidates calibration: the same seeds and conditions are recaptured.
    analyses = Analyses(
        capture=lambda reference: calib.capture(
            reference,
            calibration.seeds,
            calibration.conditions,
            progress=lambda it: progress(it, desc="calibration, new loop", leave=False),
        ),
        log=log,
    )
    analyses.provide(CALIBRATION, program, calibration)
    return Context(
        reference=program,
        analyses=analyses,
        capabilities=target.capabilities,
        progress=progress,
        rng=torch.Generator().manual_seed(opts.seed),
        seed=opts.seed,
    )


def check_space(space: SearchSpace, program: DiffusionProgram, capabilities: frozenset[str]) -> None:
    """Every recipe of the space checked against the target and the model before anything runs."""
    names = [list(k.choices) for k in space.knobs]
    for combo in itertools.islice(itertools.product(*names), MAX_RECIPES_CHECKED):
        params = dict(zip((k.name for k in space.knobs), combo, strict=True))
        try:
            plan_passes(space.recipe(params), capabilities, program=program)
        except ConfigError as exc:
            raise ConfigError(f"search recipe ({space.describe(params)}): {exc}") from None
