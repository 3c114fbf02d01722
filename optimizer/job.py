"""The main job: load -> calibrate -> passes -> lower -> verify -> report, published atomically."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.plan import record_files, record_original_loop
from backends.registry import get_backend
from calibration.capture import Trajectories
from core.adapters import parameter_count
from core.errors import ConfigError, InternalError, OptimizerError, is_environment_error
from core.ir import DiffusionProgram
from core.outputs import check_out_dir, claim, create_staging, input_paths, keep_error_log, publish, resolve
from core.progress import timed
from core.training import world
from optimizer.options import JobOptions, Loaded, Progress
from optimizer.prepare import check_options, load_checked, pass_context
from optimizer.targets import Target, get_target, require_available, target_file
from passes.manager import Analyses, PlannedPass, quick_fidelity, run_alternatives
from verify.gates import GateResult, evaluate_gates, passed


@dataclass
class JobResult:
    out: Path
    report: dict[str, Any]
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return passed(self.gates)


class ArtifactReadBackError(RuntimeError):
    """The artifact a job just wrote is refused by its own reader: a bug of ours (exit 3), not bad input."""


def _read_back(backend: Any, folder: Path) -> Any:
    """The runner of the artifact just written, opened as `optimize sample` opens it."""
    try:
        return backend.runner(folder)
    except OptimizerError as exc:
        raise ArtifactReadBackError(f"the artifact just written does not read back ({exc})") from exc


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
        loaded = load_checked(model_path, target, opts)
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
    from backends.trt_files import ENGINE_SUFFIX, TIMING_CACHE
    from optimizer.report import GRID_FILE, REPORT_FILES
    from optimizer.search_job import COPY_FILE
    from optimizer.tasks import CALIBRATION_FILE
    from search.pareto import PLOT_FILE

    return frozenset({*REPORT_FILES, GRID_FILE, CALIBRATION_FILE, COPY_FILE, PLOT_FILE, TIMING_CACHE}), (ENGINE_SUFFIX,)


def _run_trials_only(
    model_path: Path, target: Target, opts: JobOptions, progress: Progress, log: Callable[[str], None]
) -> JobResult:
    """A process contributing trials to a shared study (--storage URL --trials-only): writes no output."""
    from optimizer.search_job import contribute_trials

    count = contribute_trials(model_path, target, opts, progress, log)
    log(f"the shared study holds {count} evaluated trial(s); the job that owns it picks the finalists")
    return JobResult(opts.out, {}, [])


def _run_worker(model_path: Path, target: Target, opts: JobOptions) -> JobResult:
    """A rank > 0 of a torchrun launch: the same passes on the same calibration (deterministic), its
    share of their training (core.training); it writes nothing and prints nothing, rank 0 does."""
    from optimizer.tasks import calibrate

    loaded = load_checked(model_path, target, opts)
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
    from optimizer.tasks import CALIBRATION_FILE, calibrate, make_report, verify_lowered
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
            verification, ref_images, cand_images = verify_lowered(
                program, runner, opts, progress, loaded.judges, loaded.gates
            )
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
