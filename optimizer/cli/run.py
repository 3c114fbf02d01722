"""`optimize MODEL --target T --out DIR` (the `run` command): the job, or a search target's search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from core.errors import EXIT_GATE_FAILED, EXIT_PASS
from optimizer.cli.app import (
    ALLOW_LARGE,
    DEVICE,
    DTYPE,
    PROMPTS,
    SINGLE_FILE_CONFIG,
    VARIANT,
    judge_options,
    log,
    main,
    show_progress,
)


def _named_gates(items: tuple[str, ...]) -> dict[str, float]:
    """--gate NAME=BOUND values (names and bounds are checked with the rest of the options)."""
    gates: dict[str, float] = {}
    for item in items:
        name, sep, bound = item.partition("=")
        try:
            value = float(bound)
        except ValueError:
            value = None
        if not sep or value is None:
            raise click.BadParameter(f"{item!r}: expected NAME=BOUND, e.g. max_fd_self_shift=1.5", param_hint="--gate")
        gates[name.strip()] = value
    return gates


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="cpu-fp32", show_default=True, help="Target name or target JSON file.")
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default: optimized/<model>-<target>).",
)
@click.option("--samples", default=100, show_default=True, help="Evaluation samples (seeds) for verification.")
@click.option(
    "--seed-sets",
    default=4,
    show_default=True,
    help="Most disjoint --samples seed sets a distribution gate is judged on: at least 2 (the shift's seed noise), "
    "more while its bound lies inside the mean shift's 95% interval, 10,000 seeds in all; 1: one set, noise not "
    "measured.",
)
@click.option("--calibration-samples", default=20, show_default=True, help="Seeds captured for calibration.")
@click.option("--seed", default=0, show_default=True, help="First evaluation seed.")
@click.option("--scheduler", default=None, help="ddpm, ddim, dpmsolver++, euler or a diffusers scheduler class.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's plan).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale.")
@click.option(
    "--calibration",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Reuse a calibration.safetensors captured earlier for the same model and plan.",
)
@click.option("--min-psnr", type=float, default=None, help="Gate: minimum mean PSNR (dB) vs the original.")
@click.option("--min-ssim", type=float, default=None, help="Gate: minimum mean SSIM vs the original.")
@click.option("--max-eps-error", type=float, default=None, help="Gate: maximum per-step model-output relative error.")
@click.option("--max-agreement-drop", type=float, default=None, help="Gate: maximum class-agreement drop.")
@click.option(
    "--max-fd-shift",
    type=float,
    default=None,
    help="Gate: maximum distribution shift (FD beyond the original's floor, per feature), denoiser features.",
)
@click.option(
    "--gate",
    "extra_gates",
    multiple=True,
    metavar="NAME=BOUND",
    help="Gate by name (any of `optimize gates`), e.g. max_fid_shift=1.2; repeatable.",
)
@judge_options
@click.option("--overwrite", is_flag=True, help="Replace --out when it is an earlier `optimize` output folder.")
@click.option(
    "--latency-repeats",
    default=20,
    show_default=True,
    help="Timed calls per latency measurement (0: no latency measurement).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verification summary as JSON on stdout.")
@click.option("--resume", is_flag=True, help="Search targets: continue the interrupted search kept beside --out.")
@click.option(
    "--workers", default=1, show_default=True, help="Search targets: processes running trials on this machine."
)
@click.option(
    "--storage",
    default=None,
    help="Search targets: an Optuna storage URL (sqlite:///FILE, postgresql://...) or journal FILE.log shared by "
    "processes on several machines (default: a SQLite file beside --out).",
)
@click.option(
    "--trials-only",
    is_flag=True,
    help="Search targets: run trials of the shared --storage study and exit; the job without it finishes the search.",
)
@PROMPTS
@VARIANT
@SINGLE_FILE_CONFIG
@DEVICE
@DTYPE
@ALLOW_LARGE
def run(
    model: Path,
    target: str,
    out: Path | None,
    samples: int,
    seed_sets: int,
    calibration_samples: int,
    seed: int,
    scheduler: str | None,
    steps: int | None,
    guidance: float | None,
    calibration: Path | None,
    min_psnr: float | None,
    min_ssim: float | None,
    max_eps_error: float | None,
    max_agreement_drop: float | None,
    max_fd_shift: float | None,
    extra_gates: tuple[str, ...],
    clip: Path | None,
    inception: Path | None,
    environment: str | None,
    episodes: int,
    overwrite: bool,
    latency_repeats: int,
    as_json: bool,
    resume: bool,
    workers: int,
    storage: str | None,
    trials_only: bool,
    prompts: Path | None,
    variant: str | None,
    config: Path | None,
    device: str,
    dtype: str,
    allow_large: bool,
) -> None:
    """Optimize MODEL for TARGET. Exit 0: gates pass; 1: a gate failed; 2: bad input; 3: internal error;
    130/143: interrupted."""
    from core.placement import Placement
    from optimizer.job import run_job
    from optimizer.options import JobOptions
    from verify.gates import gates_table, verdict_line
    from verify.judges import JudgeOptions

    overrides = {
        "min_psnr_db": min_psnr,
        "min_ssim": min_ssim,
        "max_eps_rel_error": max_eps_error,
        "max_class_agreement_drop": max_agreement_drop,
        "max_fd_self_shift": max_fd_shift,
        **_named_gates(extra_gates),
    }
    stem = model.name.split(".")[0] or "model"
    opts = JobOptions(
        target=target,
        out=out or Path("optimized") / f"{stem}-{Path(target).stem}",
        samples=samples,
        seed_sets=seed_sets,
        calibration_samples=calibration_samples,
        seed=seed,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
        gates={k: v for k, v in overrides.items() if v is not None},
        calibration=calibration,
        overwrite=overwrite,
        latency_repeats=latency_repeats,
        allow_large=allow_large,
        prompts=prompts,
        variant=variant,
        config=config,
        placement=Placement(device, dtype),
        resume=resume,
        workers=workers,
        storage=storage,
        trials_only=trials_only,
        judges=JudgeOptions(clip=clip, inception=inception, episodes=episodes, environment=environment),
    )
    result = run_job(model, opts, show_progress, log)
    if not result.report:  # a torchrun worker (rank > 0): rank 0 writes and reports
        sys.exit(EXIT_PASS)
    graphs = ", ".join(result.report["artifacts"]["onnx"])
    log(f"wrote {result.out}/ ({graphs}, plan.json, report.md, report.json, grid.png)")
    if as_json:
        from optimizer.report import json_safe

        click.echo(json.dumps(json_safe(result.report["verification"]), indent=2, allow_nan=False))
    v = result.report["verification"]
    if "precision_floor_psnr_db" in v:
        log(
            f"precision floor (the {dtype} original computed in float32, against itself): "
            f"{v['precision_floor_psnr_db']:.1f} dB, per-step error {v['precision_floor_eps_rel_error']:.3g}; "
            "paired gates beyond it measure the reference's precision, not the artifact (see report.md)"
        )
    click.echo(gates_table(result.gates))
    click.echo(verdict_line(result.gates))
    sys.exit(EXIT_PASS if result.passed else EXIT_GATE_FAILED)
