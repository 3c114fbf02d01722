"""The stages of the main job, each a plain function of its inputs."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backends.onnx_export import OUTPUT_NAME, example_inputs, export_onnx, input_names
from backends.plan import GraphFile, plan_document, write_plan
from backends.qdq import export_quantized
from backends.runner import PlanRunner
from calibration import capture as calib

from .adapters import denoiser_module, parameter_count, torch_denoise
from .caching import CACHE, steps_module
from .flops import plan_flops
from .ir import DiffusionProgram
from .quantized import quantized_layers
from .sampling import sample, to_images, uses_guidance
from .targets import Target
from .timing import paired_median_ms
from .verify import DigitsJudge, compare, evaluation_set, step_errors

ONNX_FILE = "denoiser.onnx"
CALIBRATION_FILE = "calibration.safetensors"


def calibrate(
    program: DiffusionProgram,
    opts: Any,
    staging: Path,
    progress: Callable,
    given: calib.Trajectories | None = None,
) -> calib.Trajectories:
    """Capture the reference trajectories, or use `given` (read from --calibration and checked earlier)."""
    from .job import CALIBRATION_SEED

    if given is not None:
        shutil.copyfile(opts.calibration, staging / CALIBRATION_FILE)
        return given
    seeds, classes = evaluation_set(
        opts.calibration_samples, program.spec.conditioning.num_classes, CALIBRATION_SEED + opts.seed
    )
    trajectories = calib.capture(
        program, seeds, classes, progress=lambda it: progress(it, desc="calibration", leave=False)
    )
    calib.save(trajectories, staging / CALIBRATION_FILE)
    return trajectories


def lower(program: DiffusionProgram, staging: Path) -> dict[str, Any]:
    """Export every graph variant the plan runs, then plan.json saying which runs at each step."""
    spec = program.spec
    names = input_names(spec)
    if program.plan.cache is None:
        variants = {"denoiser": (denoiser_module(program), {}, ())}
    else:
        full, cached = steps_module(program, "full"), steps_module(program, "cached")
        with torch.no_grad():
            example = full(*example_inputs(spec))[1]
        variants = {"full": (full, {}, (CACHE,)), "cached": (cached, {CACHE: example}, ())}
    export = export_quantized if quantized_layers(program.denoiser) else export_onnx
    graphs = {}
    for name, (module, carried_in, carried_out) in variants.items():
        path = staging / (ONNX_FILE if name == "denoiser" else f"denoiser_{name}.onnx")
        export(module, spec, path, carried_in=carried_in, carried_out=carried_out)
        graphs[name] = GraphFile(path, [*names, *carried_in], [OUTPUT_NAME, *carried_out])
    write_plan(staging, plan_document(program, graphs))
    return {
        "onnx": [g.path.name for g in graphs.values()],
        "onnx_bytes": sum(g.path.stat().st_size for g in graphs.values()),
        "plan": "plan.json",
        "calibration": CALIBRATION_FILE,
    }


def verify_lowered(
    program: DiffusionProgram,
    runner: PlanRunner,
    opts: Any,
    progress: Callable,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Reference (original, torch) vs the lowered artifact run by the plan runner; returns images too."""
    seeds, classes = evaluation_set(opts.samples, program.spec.conditioning.num_classes, opts.seed)
    reference = calib.capture(program, seeds, classes, progress=lambda it: progress(it, desc="reference", leave=False))
    candidate = runner.sample(seeds, classes, progress=lambda it: progress(it, desc="candidate", leave=False))
    judge = DigitsJudge.load() if DigitsJudge.applies(program.spec) else None
    errors = step_errors(reference, runner.plan.sampling, runner.plan.conditioning, runner.loop)
    summary = compare(reference, candidate, errors, judge)
    return summary, to_images(reference.final), to_images(candidate)


def measure_latency(
    program: DiffusionProgram,
    runner: PlanRunner,
    repeats: int,
    baseline: PlanRunner | None = None,
    images: int = 1,
) -> dict[str, Any]:
    """`images` images: a denoiser call (their guided batch) and a whole sampling run, interleaved side by side:
    the original in torch, the artifact in ORT and, when passes changed the network, the unoptimized
    fp32 graph in ORT as well (the fair baseline for speed and size)."""
    spec, plan = program.spec, program.plan
    batch = images * (2 if uses_guidance(plan, spec.conditioning) else 1)
    x = torch.randn(batch, *spec.sample_shape)
    t = torch.full((batch,), 500.0)
    y = torch.zeros(batch, dtype=torch.int64) if spec.conditioning.num_classes else None
    seeds = list(range(images))
    labels = [0] * images if spec.conditioning.num_classes else None
    ref = torch_denoise(program)
    contenders = {"torch": ref, "ort": runner.denoise}
    if baseline is not None:
        contenders["ort_fp32"] = baseline.denoise
    step = paired_median_ms({k: (lambda f=f: f(x, t, y)) for k, f in contenders.items()}, repeats)
    loops = {
        "torch": lambda: sample(plan, spec.conditioning, spec.sample_shape, ref, seeds, labels),
        "ort": lambda: runner.sample(seeds, labels),
    }
    if baseline is not None:
        loops["ort_fp32"] = lambda: baseline.sample(seeds, labels)
    e2e = paired_median_ms(loops, max(1, repeats // 4), 1)
    result: dict[str, Any] = {
        "images": images,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "providers": runner.denoise.session.get_providers(),
    }
    for key in contenders:
        result[f"{key}_per_step_ms"] = step[key]
        result[f"{key}_end_to_end_ms"] = e2e[key]
    return result


def make_report(
    program: DiffusionProgram,
    candidate: DiffusionProgram,
    target: Target,
    artifacts: dict[str, Any],
    verification: dict[str, Any],
    latency: dict[str, Any],
    opts: Any,
    gates: dict[str, float],
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
            "conditioning": dataclasses.asdict(program.spec.conditioning),
        },
        "target": {"name": target.name, "description": target.description, "hardware": target.hardware},
        "backend": target.backend["name"],
        "plan": program.plan.to_dict(),
        "flops": {"original": plan_flops(program), "candidate": plan_flops(candidate)},
        "passes": [dataclasses.asdict(p) for p in candidate.provenance],
        "decisions": candidate.annotations,
        "artifacts": artifacts,
        "evaluation": {"samples": opts.samples, "base_seed": opts.seed},
        "verification": verification,
        "gates": gates,
        "gate_overrides": opts.gates,
        "latency": latency,
    }
