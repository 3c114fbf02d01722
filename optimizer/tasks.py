"""The tasks of the main job (calibrate, lower, verify over seed sets, report), each a plain function of its
inputs."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from backends.registry import Runner
from calibration import capture as calib
from core.adapters import parameter_count
from core.ir import DiffusionProgram
from core.pixels import to_images
from core.seeds import MAX_FAMILY
from optimizer.targets import Target
from verify import seed_sets
from verify.fidelity import step_errors
from verify.gates import GATES, GatePlan
from verify.judges import JudgePlan
from verify.verdict import Verdict, sample_floor, sample_reference

if TYPE_CHECKING:
    from optimizer.options import JobOptions

CALIBRATION_FILE = "calibration.safetensors"


def calibrate(
    program: DiffusionProgram,
    opts: JobOptions,
    staging: Path | None,
    progress: Callable,
    given: calib.Trajectories | None = None,
) -> calib.Trajectories:
    """Capture the reference trajectories, or use `given` (read from --calibration and checked earlier);
    saved into `staging` (None: kept in memory only, a torchrun worker's)."""
    if given is not None:
        if staging is not None:
            shutil.copyfile(opts.calibration, staging / CALIBRATION_FILE)
        return given
    trajectories = calib.capture_calibration(
        program, opts.calibration_samples, opts.seed, progress=lambda it: progress(it, desc="calibration", leave=False)
    )
    if staging is not None:
        calib.save(trajectories, staging / CALIBRATION_FILE)
    return trajectories


def verify_lowered(
    program: DiffusionProgram,
    runner: Runner,
    opts: JobOptions,
    progress: Callable,
    judges: JudgePlan | None = None,
    gates: GatePlan | None = None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Reference (original, torch) vs the lowered artifact run by its backend's runner, judged with the
    original's floor set beside them (the original on disjoint seeds); returns images too. The distribution
    gates of `gates` are judged on further disjoint seed sets while their noise leaves them open (see
    more_seed_sets).

    End-to-end metrics compare with the original loop. When the candidate's loop has other timesteps
    (a sampler pass), the per-step errors compare its network with the original network on its loop."""
    seeds, conditions = calib.evaluation_set(program, opts.samples, opts.seed)
    reference = calib.capture(
        program, seeds, conditions, progress=lambda it: progress(it, desc="reference", leave=False)
    )
    floor = sample_floor(program, reference, lambda it: progress(it, desc="floor (original, other seeds)", leave=False))
    verdict = Verdict(program, reference, floor, opts.judges, judges)
    candidate = runner.sample(seeds, conditions, progress=lambda it: progress(it, desc="candidate", leave=False))
    on_loop = reference
    if [float(t) for t in reference.t] != runner.plan.document["timesteps"]:
        replanned = program.replace(plan=runner.plan.sampling.without_loop_policy())
        on_loop = calib.capture(
            replanned, seeds, conditions, progress=lambda it: progress(it, desc="reference (new loop)")
        )
    errors = step_errors(on_loop, runner.plan.sampling, runner.plan.conditioning, runner.loop)
    # A latent pipeline is judged on decoded images: the candidate's by the artifact's own decoder.
    images = runner.decode(candidate) if program.stages.vae is not None else None
    summary = verdict(candidate, errors, on_loop.t.tolist(), images, closed_loop(program, runner))
    summary = more_seed_sets(program, runner, opts, progress, verdict.plan, summary, shift_bounds(gates))
    ref_x = verdict.reference_images if verdict.reference_images is not None else reference.final
    step_error, end_to_end = summary.get("eps_rel_error_max"), summary.get("psnr_db_mean")
    if step_error is not None and end_to_end is not None and step_error < TINY_STEP_ERROR and end_to_end < LOW_PSNR_DB:
        summary["loop_sensitivity_psnr_db"] = loop_sensitivity(program, seeds, conditions, step_error, to_images(ref_x))
    if not program.placement.is_default:
        summary |= precision_floor(program, reference, to_images(ref_x), progress)
    return summary, to_images(ref_x), to_images(candidate if images is None else images)


def closed_loop(program: DiffusionProgram, runner: Runner) -> Any:
    """A policy's artifact as a closed-loop policy (its runner samples and un-normalizes); None otherwise."""
    if program.spec.chunking is None:
        return None
    from core.environments.programs import as_policy
    from verify.judges.closed_loop import NOISE_SEED

    return as_policy(runner.sample, runner.decode, NOISE_SEED, runner.plan.sampling, program.spec.chunking)


def precision_floor(
    program: DiffusionProgram, reference: Any, reference_images: torch.Tensor, progress: Callable
) -> dict[str, float]:
    """How far the original itself in float32 lies from the reference it ran as (--dtype bf16/fp16): its
    end-to-end PSNR on the same seeds and conditions, and its worst per-step error on the reference's
    trajectories. A float32 lowering of an unchanged network sits here; the report states it beside the
    paired gates, which it does not change."""
    from core.loading import fp32_copy
    from core.stages import decode
    from core.variants import sample_program, torch_loop
    from verify.fidelity import step_errors
    from verify.metrics import psnr

    fp32 = fp32_copy(program)
    shown = lambda it: progress(it, desc="original in float32", leave=False)  # noqa: E731
    final = sample_program(fp32, list(reference.seeds), reference.conditions, progress=shown)
    images = decode(fp32.stages, final) if fp32.stages.vae is not None else final
    errors = step_errors(reference, fp32.plan, fp32.spec.conditioning, torch_loop(fp32))
    return {
        "precision_floor_psnr_db": float(psnr(reference_images, to_images(images)).mean()),
        "precision_floor_eps_rel_error": max(errors),
    }


def shift_bounds(gates: GatePlan | None) -> dict[str, float]:
    """The applicable distribution gates' bounds by metric prefix (fd_self, fd_digits, ...)."""
    if gates is None:
        return {}
    return {
        str(GATES[g].detail): float(b)
        for g, b in gates.applicable.items()
        if GATES[g].detail and GATES[g].kind == "max"
    }


def more_seed_sets(
    program: DiffusionProgram,
    runner: Runner,
    opts: JobOptions,
    progress: Callable,
    judges: JudgePlan,
    first: dict[str, Any],
    bounds: dict[str, float],
) -> dict[str, Any]:
    """`first` (the evaluation set's summary) pooled with further disjoint sets of opts.samples seeds, drawn
    one at a time while a distribution gate of `bounds` is undecided (verify.seed_sets), at most opts.seed_sets
    in all and MAX_FAMILY seeds (one seed family). Set k: the evaluation seeds of --seed + k x samples, the same
    conditions, its own floor set."""
    prefixes = [p for p in bounds if first.get(f"{p}_shift") is not None]
    summaries = [first]

    def open_gates() -> list[str]:
        return [p for p in prefixes if seed_sets.undecided([s[f"{p}_shift"] for s in summaries], bounds[p])]

    most = min(opts.seed_sets, MAX_FAMILY // opts.samples)  # every evaluation set lies in one seed family
    while prefixes and len(summaries) < most and open_gates():
        summaries.append(judge_seed_set(program, runner, opts, progress, judges, len(summaries)))
    pooled = seed_sets.pool(summaries, prefixes)
    pooled["seed_sets_within_noise"] = open_gates() if len(summaries) >= seed_sets.MIN_SETS else []
    return pooled


def judge_seed_set(
    program: DiffusionProgram, runner: Runner, opts: JobOptions, progress: Callable, judges: JudgePlan, k: int
) -> dict[str, Any]:
    """The candidate judged on evaluation set k (0: the first): its own reference and floor set."""
    seeds, conditions = calib.evaluation_set(program, opts.samples, opts.seed + k * opts.samples)

    def shown(what: str) -> Callable:
        return lambda it: progress(it, desc=f"seed set {k + 1}: {what}", leave=False)

    reference = sample_reference(program, seeds, conditions, shown("reference"))
    verdict = Verdict(program, reference, sample_floor(program, reference, shown("floor")), plan=judges)
    final = runner.sample(seeds, conditions, progress=shown("candidate"))
    return verdict(final, None, [], runner.decode(final) if program.stages.vae is not None else None)


# A per-step error this small with an end-to-end PSNR this low: the loop itself amplifies differences.
TINY_STEP_ERROR, LOW_PSNR_DB = 1e-4, 40.0


def loop_sensitivity(
    program: DiffusionProgram, seeds: list[int], conditions: Any, step_error: float, reference: torch.Tensor
) -> float:
    """PSNR of the original's own loop with every model output scaled by (1 + step_error) against the original:
    how far a difference of the lowering's per-step size alone carries through this loop (random weights at a
    high guidance scale: 1e-6 per step measured 13.5 dB on an SD 1.5-layout pipeline). The report states it
    beside a failed PSNR gate, which it does not change."""
    from core.stages import decode
    from core.variants import sample_program, torch_loop
    from verify.metrics import psnr

    def scaled(step):
        def call(x, t, cond, carry):
            out, written = step(x, t, cond, carry)
            return out * (1 + step_error), written

        return call

    loop = {name: scaled(step) for name, step in torch_loop(program).items()}
    final = sample_program(program, seeds, conditions, loop=loop)
    images = decode(program.stages, final) if program.stages.vae is not None else final
    return float(psnr(reference, to_images(images)).mean())


def make_report(
    program: DiffusionProgram,
    candidate: DiffusionProgram,
    target: Target,
    backend: dict[str, Any],
    flops: dict[str, Any],
    artifacts: dict[str, Any],
    verification: dict[str, Any],
    latency: dict[str, Any],
    opts: JobOptions,
    gates: GatePlan,
) -> dict[str, Any]:
    source = Path(program.source.path)
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    if source.is_file() and source.with_suffix(".json").exists():
        files.append(source.with_suffix(".json"))
    return {
        "model": {
            "source": dataclasses.asdict(program.source),
            "family": program.spec.family,
            "class": program.spec.model_class,
            "parameters": parameter_count(program.denoiser),
            "candidate_parameters": parameter_count(candidate.denoiser),
            "input_bytes": sum(f.stat().st_size for f in files),
            "sample_shape": list(program.spec.sample_shape),
            "placement": dataclasses.asdict(program.placement),  # where and in what dtype the reference ran
            "sample_axes": list(program.spec.sample_axes),
            "conditioning": program.spec.conditioning.to_dict(),
            "stages": stage_summary(program),
        },
        "target": {"name": target.name, "description": target.description, "hardware": target.hardware},
        "backend": backend["name"],
        "backend_details": backend,
        "plan": program.plan.to_dict(),
        "candidate_plan": candidate.plan.to_dict(),
        "flops": flops,
        "passes": [
            {"name": p.name, "phase": p.phase, "config": p.config, "fidelity": p.fidelity, "seconds": p.seconds}
            for p in candidate.provenance
        ],
        "decisions": {p.name: p.decision.to_dict() for p in candidate.provenance},
        "artifacts": artifacts,
        "evaluation": {"samples": opts.samples, "base_seed": opts.seed, "max_seed_sets": opts.seed_sets},
        "verification": verification,
        "gates": gates.bounds,
        "gates_not_applicable": gates.skipped,
        "gate_overrides": opts.gates,
        "judge_options": {k: None if v is None else str(v) for k, v in dataclasses.asdict(opts.judges).items()},
        "latency": latency,
    }


def stage_summary(program: DiffusionProgram) -> dict[str, Any]:
    """What the pipeline runs around the denoiser: text encoders, VAE, prompt set (report.json)."""
    stages = program.stages
    return {
        "text_encoders": [type(e).__name__ for e in stages.text_encoders],
        "text_encoder_parameters": sum(parameter_count(e) for e in stages.text_encoders),
        "vae": type(stages.vae).__name__ if stages.vae is not None else None,
        "output": "latents decoded by the VAE" if stages.vae is not None else _output(program),
        "prompts": len(stages.prompts),
        "unconditional": _unconditional(program),
    }


def _output(program: DiffusionProgram) -> str:
    if program.spec.output_normalization is not None:
        return (
            f"actions (the policy's normalization undone), acting in {program.stages.environment or 'no environment'}"
        )
    return "pixels" if program.spec.image_like else "samples"


def _unconditional(program: DiffusionProgram) -> str | None:
    """The unconditional branch of classifier-free guidance, as the report states it."""
    if not program.spec.conditioning.text:
        return None
    if program.plan.guidance_scale <= 1.0:
        return "none: no classifier-free guidance in this plan (guidance scale 1)"
    from core.prompts import text_adapter

    if text_adapter(program).zero_uncond(program.stages):
        return "zeros (the pipeline's force_zeros_for_empty_prompt)"
    return "the empty prompt"
