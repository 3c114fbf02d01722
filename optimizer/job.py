"""The main job: load -> calibrate -> passes -> lower -> verify -> report, published atomically."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .fileio import umask
from .gates import GateResult, check_gate_names, evaluate_gates
from .ir import DiffusionProgram
from .loading import load_program
from .pipeline import Context, plan_passes, run_passes
from .sampling import uses_guidance, with_scheduler
from .targets import get_target, require_available

CALIBRATION_SEED = 10_000  # calibration and evaluation use disjoint seeds
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


@dataclass
class JobResult:
    out: Path
    report: dict[str, Any]
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(r.passed is not False for r in self.gates)


def apply_sampling_options(program: DiffusionProgram, opts: JobOptions) -> DiffusionProgram:
    plan = program.plan
    if opts.scheduler:
        plan = with_scheduler(plan, opts.scheduler)
    if opts.steps is not None:
        if opts.steps < 1:
            raise ConfigError("--steps must be >= 1")
        plan = dataclasses.replace(plan, num_inference_steps=opts.steps)
    if opts.guidance is not None:
        if opts.guidance > 1 and not program.spec.conditioning.supports_guidance:
            raise ConfigError("this model has no null class, so classifier-free guidance is not possible")
        plan = dataclasses.replace(plan, guidance_scale=float(opts.guidance))
    return program.replace(plan=plan)


def check_out_dir(out: Path, model: Path, overwrite: bool) -> None:
    out, model = out.resolve(), model.resolve()
    holder = model if model.is_dir() else model.parent
    if out == holder or out in model.parents or (model.is_dir() and model in out.parents):
        raise ConfigError(f"--out {out} would write into or over the input model; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty (use --overwrite to replace it)")


def publish(staging: Path, out: Path) -> None:
    """Swap the finished staging folder into place; an old `out` is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{staging.name}")
        out.rename(old)
    staging.chmod(0o777 & ~umask())
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def run_job(model_path: Path, opts: JobOptions, progress: Progress, log: Callable[[str], None]) -> JobResult:
    from backends.runner import PlanRunner

    from .report import GRID_FILE, save_grid, write_report
    from .stages import calibrate, lower, make_report, measure_latency, verify_lowered

    # Everything that can be checked is checked before any work starts.
    target = get_target(opts.target)
    require_available(target)
    check_gate_names(opts.gates, "command line")
    if opts.samples < 2 or opts.calibration_samples < 1:
        raise ConfigError("--samples must be >= 2 and --calibration-samples >= 1")
    check_out_dir(opts.out, model_path, opts.overwrite)
    log(f"loading {model_path}")
    program = apply_sampling_options(load_program(model_path), opts)
    planned = plan_passes(target.recipe, target.capabilities)
    gates = {**target.gates, **opts.gates}

    opts.out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.staging-", dir=opts.out.resolve().parent))
    try:
        log("calibrating: capturing reference trajectories")
        calibration = calibrate(program, opts, staging, progress)
        ctx = Context(
            reference=program,
            calibration=calibration,
            capabilities=target.capabilities,
            evaluate=lambda p: _quick_fidelity(p, calibration),
            progress=progress,
            rng=torch.Generator().manual_seed(opts.seed),
        )
        candidate = run_passes(program, planned, ctx)
        log(f"lowering to ONNX for {target.backend['name']}")
        artifacts = lower(candidate, staging)
        log(f"verifying on {opts.samples} samples")
        providers = tuple(target.backend.get("providers", ()))
        runner = PlanRunner(staging, providers)
        verification, ref_images, cand_images = verify_lowered(program, runner, opts, progress)
        baseline = None
        if candidate.provenance:  # the network or loop changed: time the unoptimized graph beside it
            log("lowering the original as the fp32 ONNX baseline")
            reference_dir = staging / ".reference"
            reference_dir.mkdir()
            artifacts["reference_onnx_bytes"] = lower(program, reference_dir)["onnx_bytes"]
            baseline = PlanRunner(reference_dir, providers)
        log("measuring latency side by side")
        latency = measure_latency(program, runner, opts.latency_repeats, baseline)
        if baseline is not None:
            del baseline
            shutil.rmtree(staging / ".reference")
        results = evaluate_gates(gates, verification)
        report = make_report(program, candidate, target, artifacts, verification, latency, opts, gates)
        save_grid(staging / GRID_FILE, ref_images, cand_images)
        write_report(staging, report, results)
        publish(staging, opts.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return JobResult(opts.out, report, results)


def _quick_fidelity(program: DiffusionProgram, calibration: Any) -> dict[str, Any]:
    """After each pass: teacher-forced model-output error and end-to-end PSNR on the calibration set."""
    from .caching import torch_variants
    from .flops import plan_flops
    from .verify import replay_psnr, step_errors

    variants = torch_variants(program)
    errors = step_errors(calibration, program.plan, program.spec.conditioning, variants)
    return {
        "calibration_psnr_db": replay_psnr(program, calibration, variants),
        "eps_rel_error_mean": sum(errors) / len(errors),
        "eps_rel_error_max": max(errors),
        "guidance": uses_guidance(program.plan, program.spec.conditioning),
        "flops_per_image": plan_flops(program)["per_image"],
    }
