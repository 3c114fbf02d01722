"""Step reduction side by side at equal network evaluations (NFE) per image, same seeds.

Rows: the original loop; plain DDIM cut to the NFE budget (guided with half the steps, or unguided
with all of them); the training-free searched schedule (passes.schedule) under the same two splits;
and the distilled students (guidance + progressive distillation, the cpu-steps recipe). Every row's
samples are judged against the original's (paired PSNR, class/prompt agreement, the distribution against
the original's floor set), and every row's whole loop runs in ONNX Runtime, timed side by side in one run.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.registry import get_backend
from bench.comparison import comparison_set
from core.adapters import torch_denoise
from core.conditions import encode
from core.ir import DiffusionProgram
from core.sampling import network_evaluations, sample
from passes.manager import offline_context, plan_passes, run_passes
from verify.fidelity import per_step_error
from verify.timing import paired_median_ms
from verify.verdict import floor_cell


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    recipe: list[dict[str, Any]]
    guided: bool = True  # False: classifier-free guidance off before the recipe runs


def rows_for(nfe: int, distill_recipe: list[dict[str, Any]]) -> list[Row]:
    """The comparison at `nfe` evaluations per image (even: the guided rows take nfe / 2 steps)."""
    half = max(1, nfe // 2)
    return [
        Row(f"DDIM {half} steps x CFG", [{"pass": "sampler", "config": {"sampling_steps": half}}]),
        Row(f"DDIM {nfe} steps, no CFG", [{"pass": "sampler", "config": {"sampling_steps": nfe}}], guided=False),
        Row(f"searched schedule {half} steps x CFG", [{"pass": "schedule", "config": {"sampling_steps": half}}]),
        Row(
            f"searched schedule {nfe} steps, no CFG",
            [{"pass": "schedule", "config": {"sampling_steps": nfe}}],
            guided=False,
        ),
        Row(f"distilled: guidance + progressive to {nfe} steps", distill_recipe),
    ]


def nfe(program: DiffusionProgram) -> int:
    """Network evaluations per image of the program's loop."""
    return network_evaluations(program.plan, program.spec.conditioning)


def compare_steps(
    program: DiffusionProgram,
    rows: list[Row],
    samples: int,
    calibration_samples: int,
    progress: Callable,
    log: Callable[[str], None],
    latency_repeats: int = 8,
) -> list[dict[str, Any]]:
    spec = program.spec
    trajectories, seeds, conditions, reference, verdict = comparison_set(program, samples, calibration_samples, log)
    batch = encode(program, conditions, len(seeds))
    ctx = offline_context(program, trajectories, progress=progress)
    candidates = [("original", program)]
    for row in rows:
        log(row.name)
        start = program
        if not row.guided:
            start = program.replace(plan=dataclasses.replace(program.plan, guidance_scale=1.0, guided_steps=None))
        candidates.append((row.name, run_passes(start, plan_passes(row.recipe, ctx.capabilities), ctx)))
    results, loops = [], {}
    backend = get_backend({"name": "onnxruntime"})
    with tempfile.TemporaryDirectory(prefix="steps-compare-") as tmp:
        for i, (name, candidate) in enumerate(candidates):
            denoise = torch_denoise(candidate)
            final = sample(candidate.plan, spec.sample_shape, denoise, seeds, batch)
            summary = verdict(final, per_step_error(reference, denoise))
            folder = Path(tmp) / f"row{i}"
            backend.lower(candidate, folder)
            runner = backend.runner(folder)
            loops[name] = lambda r=runner: r.sample(seeds[:1], None if conditions is None else conditions[:1])
            results.append(
                {
                    "name": name,
                    "steps": candidate.plan.num_inference_steps,
                    "nfe": nfe(candidate),
                    "scheduler": candidate.plan.scheduler_class,
                    "timesteps": list(candidate.plan.timesteps or ()),
                    "seconds": sum(r.seconds for r in candidate.provenance),
                    **{k: v for k, v in summary.items() if not isinstance(v, list)},
                }
            )
        results.append(_seed_floor(program, conditions, verdict, len(seeds)))
        log("ONNX Runtime, whole loop for 1 image, every row side by side")
        timed = paired_median_ms(loops, repeats=latency_repeats, warmup=1)
    for r in results:
        r["ort_loop_ms"] = timed.get(r["name"], timed["original"])
        r["ort_speedup"] = timed["original"] / r["ort_loop_ms"]
    return results


FLOOR = "original on other seeds (a null draw)"


def _seed_floor(program: DiffusionProgram, conditions: Any, verdict: Any, n: int) -> dict[str, Any]:
    """The original itself on fresh seeds with the same conditions: the ratios a second draw of the
    original gets (the null); paired PSNR is meaningless here."""
    from core.variants import sample_program
    from verify.verdict import null_seeds

    seeds = null_seeds(0, n)
    summary = verdict(sample_program(program, seeds, conditions), [0.0])
    row = {k: v for k, v in summary.items() if not isinstance(v, list)}
    return {
        **row,
        "name": FLOOR,
        "steps": program.plan.num_inference_steps,
        "nfe": nfe(program),
        "seconds": 0.0,
        "scheduler": program.plan.scheduler_class,
        "timesteps": [],
        "psnr_db_mean": None,
        "psnr_db_min": None,
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| row | NFE/image | PSNR mean / min (dB) | agreement ref / cand | shift (FD / floor), denoiser features | "
        "shift (FD / floor), digits classifier | ORT loop ms (speedup) | pass seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        agree = r.get("class_agreement_candidate")
        agreement = "n/a" if agree is None else f"{r['class_agreement_reference']:.2f} / {agree:.2f}"
        psnr = "n/a" if r["psnr_db_mean"] is None else f"{r['psnr_db_mean']:.2f} / {r['psnr_db_min']:.2f}"
        lines.append(
            f"| {r['name']} | {r['nfe']} | {psnr} | {agreement} | {floor_cell(r, 'fd_self')} | "
            f"{floor_cell(r, 'fd_digits')} | {r['ort_loop_ms']:.1f} ({r['ort_speedup']:.2f}x) | {r['seconds']:.0f} |"
        )
    lines.append(
        "\nThe noise-floor row is the original's own loop (timed as the original), other seeds, same conditions."
    )
    return "\n".join(lines)
