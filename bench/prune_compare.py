"""Side by side on one model and one evaluation set: our pruning criteria vs naive ones at equal compression.

Each row runs a recipe of the structural passes (layer_removal, prune, optionally recover), is
lowered to ONNX, and reports parameters, FLOPs per image, ONNX size and ONNX Runtime latency per step
(every row's graph timed side by side in one run, the original's fp32 graph included), and fidelity
vs the original loop on the same seeds. Rows at equal compression differ only in the criterion.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backends.ort import OrtDenoiser
from backends.registry import get_backend
from bench.comparison import comparison_set
from core.adapters import parameter_count, torch_denoise
from core.conditions import encode, example_conditions
from core.flops import plan_flops
from core.ir import DiffusionProgram
from core.sampling import sample
from passes.manager import offline_context, plan_passes, run_passes
from verify.fidelity import per_step_error
from verify.timing import paired_median_ms
from verify.verdict import floor_cell

RECOVER = {"pass": "recover", "config": {"steps": 600}}  # as the cpu-prune target


def _remove(criterion: str) -> dict[str, Any]:
    return {"pass": "layer_removal", "config": {"blocks": 2, "criterion": criterion}}


def _prune(criterion: str) -> dict[str, Any]:
    return {"pass": "prune", "config": {"mlp": 0.25, "channels": 0.25, "criterion": criterion}}


ROWS: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {
    "dit": [
        ("2 of 8 blocks, one-shot distortion (ours)", [_remove("distortion")]),
        ("2 of 8 blocks, last two (naive)", [_remove("last")]),
        ("MLP -25%, Taylor over the plan's timesteps (ours)", [_prune("taylor")]),
        ("MLP -25%, output-contribution energy", [_prune("distortion")]),
        ("MLP -25%, weight magnitude (naive)", [_prune("magnitude")]),
        ("2 blocks + MLP -25%, ours", [_remove("distortion"), _prune("taylor")]),
        ("2 blocks + MLP -25%, naive", [_remove("last"), _prune("magnitude")]),
        ("2 blocks + MLP -25%, ours + recovery (cpu-prune)", [_remove("distortion"), _prune("taylor"), RECOVER]),
        ("2 blocks + MLP -25%, naive + recovery", [_remove("last"), _prune("magnitude"), RECOVER]),
    ],
    "unet": [
        ("resnet channels -25%, Taylor over the plan's timesteps (ours)", [_prune("taylor")]),
        ("resnet channels -25%, output-contribution energy", [_prune("distortion")]),
        ("resnet channels -25%, weight magnitude (naive)", [_prune("magnitude")]),
        ("resnet channels -25%, ours + recovery (cpu-prune)", [_prune("taylor"), RECOVER]),
        ("resnet channels -25%, naive + recovery", [_prune("magnitude"), RECOVER]),
    ],
}


def compare_pruning(
    program: DiffusionProgram,
    samples: int,
    calibration_samples: int,
    progress: Callable,
    log: Callable[[str], None],
    rows: list[tuple[str, list[dict[str, Any]]]] | None = None,
    latency_repeats: int = 20,
    desc: str = "pruning recipes",
) -> list[dict[str, Any]]:
    from core.errors import ConfigError

    spec = program.spec
    if rows is None:
        if spec.family not in ROWS:
            raise ConfigError(f"no pruning comparison for the {spec.family} family")
        rows = ROWS[spec.family]
    trajectories, seeds, conditions, reference, verdict = comparison_set(program, samples, calibration_samples, log)
    batch = encode(program, conditions, len(seeds))
    ctx = offline_context(program, trajectories, progress=progress)
    results: list[dict[str, Any]] = []
    graphs: dict[str, OrtDenoiser] = {}
    with tempfile.TemporaryDirectory(prefix="prune-compare-") as tmp:
        work = Path(tmp)
        candidates: list[tuple[str, DiffusionProgram | str, list]] = [("original", program, [])]
        for name, recipe in progress(rows, desc=desc):
            log(name)
            plan = plan_passes(recipe, ctx.capabilities)  # a bad recipe is a bug in the rows: raise
            try:
                candidates.append((name, run_passes(program, plan, ctx), recipe))
            except ConfigError as exc:  # e.g. a budget this model cannot meet: that row fails, not the run
                log(f"{name}: failed: {exc}")
                candidates.append((name, str(exc), recipe))
        for i, (name, candidate, recipe) in enumerate(candidates):
            if isinstance(candidate, str):
                results.append({"name": name, "recipe": recipe, "failed": candidate})
                continue
            folder = work / f"row{i}"
            size = get_backend({"name": "onnxruntime"}).lower(candidate, folder)["onnx_bytes"]
            graphs[name] = OrtDenoiser(folder / "denoiser.onnx", condition_names=spec.conditioning.input_names)
            denoise = torch_denoise(candidate)
            final = sample(candidate.plan, spec.sample_shape, denoise, seeds, batch)
            summary = verdict(final, per_step_error(reference, denoise))
            results.append(
                {
                    "name": name,
                    "recipe": recipe,
                    "parameters": parameter_count(candidate.denoiser),
                    "flops_per_image": plan_flops(candidate)["per_image"],
                    "onnx_bytes": size,
                    "recovery": _to_dict(candidate.decision("recover")),
                    **{k: v for k, v in summary.items() if not isinstance(v, list)},
                }
            )
        log("ONNX Runtime latency per step, every graph side by side")
        x = torch.randn(2, *spec.sample_shape)
        t = torch.full((2,), 500.0)
        cond = example_conditions(spec.conditioning, 2)
        timed = paired_median_ms(
            {n: functools.partial(g, x, t, cond) for n, g in graphs.items()}, repeats=latency_repeats
        )
    for r in results:
        if "failed" not in r:
            r["ort_step_ms"] = timed[r["name"]]
            r["ort_speedup"] = timed["original"] / timed[r["name"]]
    return results


def markdown_table(results: list[dict[str, Any]]) -> str:
    base = results[0]
    lines = [
        "| row | parameters | FLOPs/image | ONNX MB | ORT ms/step (speedup) | eps rel. error | PSNR mean / min dB | "
        "SSIM | class agreement | FD to data | shift (FD / floor), denoiser features |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['name']} | failed: {r['failed']} |" + " |" * 9)
            continue
        agree, fd = r.get("class_agreement_candidate"), r.get("fd_candidate_to_data")
        lines.append(
            f"| {r['name']} | {r['parameters'] / base['parameters']:.3f} | "
            f"{r['flops_per_image'] / base['flops_per_image']:.3f} | {r['onnx_bytes'] / 1e6:.2f} | "
            f"{r['ort_step_ms']:.2f} ({r['ort_speedup']:.2f}x) | {r['eps_rel_error_mean']:.4f} | "
            f"{r['psnr_db_mean']:.2f} / {r['psnr_db_min']:.2f} | {r['ssim_mean']:.3f} | "
            f"{'n/a' if agree is None else f'{agree:.2f}'} | {'n/a' if fd is None else f'{fd:.2f}'} | "
            f"{floor_cell(r, 'fd_self')} |"
        )
    lines.append("\nParameters and FLOPs are fractions of the original's; latency: batch 2 (a guided step), median.")
    return "\n".join(lines)


def _to_dict(decision: Any) -> dict[str, Any] | None:
    return None if decision is None else decision.to_dict()
