"""The main job: load -> calibrate -> passes -> lower -> verify -> report, published atomically."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from backends.plan import record_files, record_original_loop
from backends.registry import get_backend
from calibration import capture as calib
from calibration.capture import Trajectories
from core import limits
from core.adapters import parameter_count
from core.errors import ConfigError, InternalError, OptimizerError, is_environment_error
from core.fileio import require_regular_file
from core.ir import DiffusionProgram
from core.loading import MAX_GUIDANCE, load_program
from core.outputs import check_out_dir, claim, create_staging, input_paths, keep_error_log, publish, resolve
from core.progress import timed
from core.sampling import check_plan, model_calls, uses_guidance, with_scheduler
from core.training import world
from core.validate import integer, number
from optimizer.targets import Target, get_target, require_available, target_file
from passes.base import CALIBRATION, Context
from passes.manager import Analyses, PlannedPass, plan_passes, quick_fidelity, run_alternatives
from verify.gates import GatePlan, GateResult, check_gate_names, evaluate_gates, passed, plan_gates
from verify.judges import JudgeOptions, JudgePlan, plan_judges

Progress = Callable[..., Iterable]


@dataclass
class JobOptions:
    target: str = "cpu-fp32"
    out: Path = Path("optimized")
    samples: int = 100
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
    # Search targets (`*-auto`): continue an interrupted search, processes running trials, shared storage,
    # and trials only (a worker of a shared study: no output, no finalists).
    resume: bool = False
    workers: int = 1
    storage: str | None = None
    trials_only: bool = False
    judges: JudgeOptions = field(default_factory=JudgeOptions)  # user-supplied feature models (--clip, --inception)


@dataclass
class JobResult:
    out: Path
    report: dict[str, Any]
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return passed(self.gates)


class Loaded(NamedTuple):
    """What the job checked before any work: the program, its recipes, the --calibration trajectories,
    the judges that apply to the model and, from them, the gates that can be measured."""

    program: DiffusionProgram
    recipes: list[list[PlannedPass]]
    given: Trajectories | None
    judges: JudgePlan
    gates: GatePlan


def check_options(opts: JobOptions) -> None:
    """Every number a user can pass, bounded, before anything else runs."""
    integer(opts.samples, "--samples", 2, limits.MAX_SAMPLES)
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


class ArtifactReadBackError(RuntimeError):
    """The artifact a job just wrote is refused by its own reader: a bug of ours (exit 3), not bad input."""


def _read_back(backend: Any, folder: Path) -> Any:
    """The runner of the artifact just written, opened as `optimize sample` opens it."""
    try:
        return backend.runner(folder)
    except OptimizerError as exc:
        raise ArtifactReadBackError(f"the artifact just written does not read back ({exc})") from exc


def check_job_memory(program: DiffusionProgram, samples: int, allow_large: bool, processes: int = 1) -> None:
    """Refuse a run whose largest batch, `samples` seeds sampled at once, would not fit in memory, in
    each of `processes` (a search's --workers each hold the model and run trials)."""
    spec, plan = program.spec, program.plan
    footprint = limits.footprint(spec.model_class, spec.model_config)
    need = limits.job_memory(
        footprint,
        spec.sample_shape,
        model_calls(plan),
        uses_guidance(plan, spec.conditioning),
        samples,
    )
    advice = "use fewer --samples / --calibration-samples" + (" or --workers" if processes > 1 else "")
    limits.require_memory(need * processes, "this run", advice, allow_large)


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


def job_inputs(model_path: Path, opts: JobOptions) -> list[Path]:
    """Everything the job reads, which --out must never touch."""
    given = [target_file(opts.target), opts.calibration, opts.prompts, opts.judges.clip, opts.judges.inception]
    given.append(opts.config)
    return [*input_paths(model_path), *(p for p in given if p is not None)]


def run_job(model_path: Path, opts: JobOptions, progress: Progress, log: Callable[[str], None]) -> JobResult:
    # Everything that can be checked is checked before any work starts.
    check_options(opts)
    target = get_target(opts.target)
    require_available(target)
    if target.search is None and (opts.resume or opts.workers > 1 or opts.storage or opts.trials_only):
        raise ConfigError(
            f"--resume, --workers, --storage and --trials-only are for search targets; {target.name} has no search"
        )
    if target.search is not None:
        from optimizer.search_job import check_storage

        check_storage(opts, None if opts.trials_only else resolve(opts.out, "--out"), job_inputs(model_path, opts))
    if target.search is not None and world().size > 1:
        raise ConfigError("a search runs its trials in processes of its own (--workers), not under torchrun")
    if not world().is_main:
        return _run_worker(model_path, target, opts)
    if opts.trials_only:
        return _run_trials_only(model_path, target, opts, progress, log)
    out = check_out_dir(opts.out, job_inputs(model_path, opts), opts.overwrite, *output_names())
    with claim(out) as held:
        loaded = _load_checked(model_path, target, opts)
        program = loaded.program
        log(f"loaded {model_path} ({program.spec.model_class}, {parameter_count(program.denoiser):,} parameters)")
        for note in program.source.notes:
            log(f"note: {note}")
        judges = ", ".join(j.name for j in loaded.judges.active)
        log(f"judges: {judges}; gates to measure: {', '.join(loaded.gates.applicable)}")
        for gate, why in loaded.gates.skipped.items():
            log(f"gate {gate} does not apply to this model ({why})")
        staging = create_staging(out, log)
        try:
            result = _run_stages(model_path, loaded, target, opts, staging, progress, log)
            publish(staging, held)
        except BaseException as exc:
            if target.search is not None and not opts.storage:
                from optimizer.search_job import state_dir

                if state_dir(opts.out).exists():
                    log(f"the search's trials are kept in {state_dir(opts.out)}: rerun with --resume to continue")
            if isinstance(exc, Exception) and not isinstance(exc, OptimizerError) and not is_environment_error(exc):
                raise InternalError(exc, keep_error_log(staging, exc)) from exc
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if target.search is not None:
            from optimizer.search_job import finish

            finish(opts)
    return dataclasses.replace(result, out=opts.out)


def output_names() -> tuple[frozenset[str], tuple[str, ...]]:
    """The names a job writes beside the graphs plan.json records, and the suffixes of files it derives
    from a graph's name (TensorRT engines): what --overwrite may replace (core.outputs.not_ours)."""
    from backends.trt import ENGINE_SUFFIX, TIMING_CACHE
    from optimizer.report import GRID_FILE, REPORT_FILES
    from optimizer.search_job import COPY_FILE
    from optimizer.stages import CALIBRATION_FILE
    from search.pareto import PLOT_FILE

    return frozenset({*REPORT_FILES, GRID_FILE, CALIBRATION_FILE, COPY_FILE, PLOT_FILE, TIMING_CACHE}), (ENGINE_SUFFIX,)


def _load_checked(model_path: Path, target: Target, opts: JobOptions) -> Loaded:
    """The program with the command line's sampling options, its recipes (or search space) checked
    against it, the judges and gates that apply to it, the memory estimate checked, and the --calibration
    trajectories if given (every rank and search worker the same)."""
    loaded = load_for_job(model_path, opts.allow_large, opts.prompts, opts.variant, opts.config)
    program = apply_sampling_options(loaded, opts)
    if target.search is not None:
        from optimizer.search_job import check_space

        check_space(target.search, program, target.capabilities)
    recipes = [plan_passes(recipe, target.capabilities, program=program) for recipe in target.recipes]
    # The largest batch is the verification set or the calibration set, each sampled at once.
    workers = opts.workers if target.search is not None else 1
    check_job_memory(program, max(opts.samples, opts.calibration_samples), opts.allow_large, workers)
    judges = plan_judges(program, opts.judges)
    gates = plan_gates({**target.gates, **opts.gates}, judges, explicit=opts.gates)
    given = calib.load(opts.calibration, program) if opts.calibration is not None else None
    return Loaded(program, recipes, given, judges, gates)


def _run_trials_only(
    model_path: Path, target: Target, opts: JobOptions, progress: Progress, log: Callable[[str], None]
) -> JobResult:
    """A process contributing trials to a shared study (--storage URL --trials-only): writes no output."""
    count = contribute_trials(model_path, target, opts, progress, log)
    log(f"the shared study holds {count} evaluated trial(s); the job that owns it picks the finalists")
    return JobResult(opts.out, {}, [])


def contribute_trials(
    model_path: Path, target: Target, opts: JobOptions, progress: Progress, log: Callable[[str], None], index: int = 0
) -> int:
    """Trials of the shared study from the same program, calibration and proxies as every other process
    (deterministic); `index` tells workers' samplers apart. Returns the study's evaluated count."""
    from optimizer.search_job import run_trials_only, study_name
    from optimizer.stages import calibrate

    loaded = _load_checked(model_path, target, opts)
    calibration = calibrate(loaded.program, opts, None, progress, loaded.given)
    ctx = pass_context(loaded.program, target, opts, calibration, progress, log)
    name = study_name(loaded.program, target, opts)
    return run_trials_only(loaded, target, opts, ctx, name, index, log)


def _run_worker(model_path: Path, target: Target, opts: JobOptions) -> JobResult:
    """A rank > 0 of a torchrun launch: the same passes on the same calibration (deterministic), its
    share of their training (core.training); it writes nothing and prints nothing, rank 0 does."""
    from optimizer.stages import calibrate

    loaded = _load_checked(model_path, target, opts)
    quiet: Progress = lambda it, **_: it  # noqa: E731
    calibration = calibrate(loaded.program, opts, None, quiet, loaded.given)
    _optimize(loaded.program, target, loaded.recipes, opts, calibration, quiet, lambda _: None)
    return JobResult(opts.out, {}, [])


def _optimize(
    program: DiffusionProgram,
    target: Target,
    recipes: list[list[PlannedPass]],
    opts: JobOptions,
    calibration: Trajectories,
    progress: Progress,
    log: Callable[[str], None],
) -> tuple[DiffusionProgram, Any, Analyses]:
    """Run the target's recipes (keeping the best of its alternatives) from the calibration set."""
    ctx = pass_context(program, target, opts, calibration, progress, log)
    candidate, choice = run_alternatives(program, recipes, ctx, evaluate=quick_fidelity, log=log)
    return candidate, choice, ctx.analyses


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


def _run_stages(
    model_path: Path,
    loaded: Loaded,
    target: Target,
    opts: JobOptions,
    staging: Path,
    progress: Progress,
    log: Callable[[str], None],
) -> JobResult:
    from optimizer.report import GRID_FILE, decision_sections, save_grid, write_report
    from optimizer.stages import CALIBRATION_FILE, calibrate, make_report, verify_lowered
    from verify.latency import measure_latency

    program, recipes, given = loaded.program, loaded.recipes, loaded.given
    backend = get_backend(target.backend)
    source = (
        "using --calibration" if given is not None else f"capturing {opts.calibration_samples} reference trajectories"
    )
    with timed(log, f"calibrating ({source})"):
        calibration = calibrate(program, opts, staging, progress, given)
    outcome = None
    if target.search is None:
        candidate, choice, analyses = _optimize(program, target, recipes, opts, calibration, progress, log)
        with timed(log, f"lowering for {backend.name}"):
            artifacts = {**backend.lower(candidate, staging), "calibration": CALIBRATION_FILE}
        with timed(log, f"verifying on {opts.samples} samples"):
            runner = _read_back(backend, staging)
            verification, ref_images, cand_images = verify_lowered(program, runner, opts, progress, loaded.judges)
    else:
        from optimizer.search_job import run_search_stage

        ctx = pass_context(program, target, opts, calibration, progress, log)
        outcome = run_search_stage(model_path, loaded, target, opts, ctx, backend, staging, progress, log)
        candidate, choice, analyses = outcome.candidate, None, ctx.analyses
        _, files, verification, ref_images, cand_images = outcome.verified
        runner = _read_back(backend, staging)
        artifacts = {**files, "calibration": CALIBRATION_FILE}
    record_files(staging, [CALIBRATION_FILE])
    record_original_loop(staging, program.plan)
    baseline, timed_run = None, opts.latency_repeats > 0
    if candidate.provenance and timed_run:  # the network or loop changed: time the unoptimized graph beside it
        with timed(log, "lowering the original as the fp32 baseline"):
            reference_dir = staging / ".reference"
            reference_dir.mkdir()
            artifacts["reference_onnx_bytes"] = backend.lower(program, reference_dir)["onnx_bytes"]
            baseline = _read_back(backend, reference_dir)
    latency: dict[str, Any] = {"skipped": "--latency-repeats 0"}
    if timed_run:
        with timed(log, "measuring latency side by side"):
            latency = measure_latency(program, runner, opts.latency_repeats, baseline)
    if baseline is not None:
        del baseline
        shutil.rmtree(staging / ".reference")
    results = evaluate_gates(loaded.gates, verification)
    # The runner's description is the backend's plus what its runtime chose (e.g. providers).
    # FLOPs from the analyses cache: the passes counted them already (and once when nothing changed).
    flops = {"original": analyses.flops(program), "candidate": analyses.flops(candidate)}
    description = runner.describe()
    report = make_report(
        program, candidate, target, description, flops, artifacts, verification, latency, opts, loaded.gates
    )
    sections = decision_sections(candidate)
    if choice is not None:
        report["recipe_selection"] = choice.to_dict()
        sections = ["", f"## {choice.title}", *choice.markdown(), *sections]
    if outcome is not None:
        report["search"] = outcome.record
        sections = [*outcome.sections, *sections]
    save_grid(staging / GRID_FILE, ref_images, cand_images)
    write_report(staging, report, results, sections)
    return JobResult(opts.out, report, results)
