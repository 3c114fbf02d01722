"""`optimize MODEL --target T --out DIR`, plus `inspect`, `targets`, `calibrate`, `sample`, `bench`, the comparisons."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError, OptimizerError

HELP = """Optimize a trained diffusion model for a deployment target, verify it, write a report.

\b
  optimize MODEL --target cpu-fp32 --out DIR    (same as `optimize run ...`)
  optimize inspect MODEL
  optimize targets
"""


class DefaultRunGroup(click.Group):
    """Treat `optimize MODEL ...` as `optimize run MODEL ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _progress(iterable: Any, **kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, unit="step", disable=None, **kwargs)  # None: off when not a terminal


def _log(message: str) -> None:
    click.echo(f"[optimize] {message}", err=True)


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group(cls=DefaultRunGroup, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    pass


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
@click.option("--max-fd-increase", type=float, default=None, help="Gate: maximum Fréchet-distance increase.")
@click.option("--max-fd-to-reference", type=float, default=None, help="Gate: maximum FD candidate vs reference.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--latency-repeats", default=20, show_default=True, help="Timed calls per latency measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print the verification summary as JSON on stdout.")
def run(
    model: Path,
    target: str,
    out: Path | None,
    samples: int,
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
    max_fd_increase: float | None,
    max_fd_to_reference: float | None,
    overwrite: bool,
    latency_repeats: int,
    as_json: bool,
) -> None:
    """Optimize MODEL for TARGET; exit 1 when a quality gate fails, 2 on bad input."""
    from .gates import gates_table
    from .job import JobOptions, run_job

    overrides = {
        "min_psnr_db": min_psnr,
        "min_ssim": min_ssim,
        "max_eps_rel_error": max_eps_error,
        "max_class_agreement_drop": max_agreement_drop,
        "max_fd_increase": max_fd_increase,
        "max_fd_to_reference": max_fd_to_reference,
    }
    stem = model.name.split(".")[0] or "model"
    opts = JobOptions(
        target=target,
        out=out or Path("optimized") / f"{stem}-{Path(target).stem}",
        samples=samples,
        calibration_samples=calibration_samples,
        seed=seed,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
        gates={k: v for k, v in overrides.items() if v is not None},
        calibration=calibration,
        overwrite=overwrite,
        latency_repeats=latency_repeats,
    )
    try:
        result = run_job(model, opts, _progress, _log)
    except OptimizerError as exc:
        _fail(exc)
    graphs = ", ".join(result.report["artifacts"]["onnx"])
    _log(f"wrote {result.out}/ ({graphs}, plan.json, report.md, report.json, grid.png)")
    if as_json:
        click.echo(json.dumps(result.report["verification"], indent=2))
    click.echo(gates_table(result.gates))
    click.echo("PASS" if result.passed else "FAIL: a quality gate failed (see the table above)")
    sys.exit(0 if result.passed else 1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
def inspect(model: Path) -> None:
    """Describe MODEL: architecture, blocks, attention sites, conditioning, sampling plan."""
    import dataclasses

    from .adapters import parameter_count
    from .loading import load_program

    try:
        program = load_program(model)
    except OptimizerError as exc:
        _fail(exc)
    spec = dataclasses.asdict(program.spec)
    spec.pop("model_config")
    info = {
        "source": dataclasses.asdict(program.source),
        "spec": spec,
        "plan": program.plan.to_dict(),
        "parameters": parameter_count(program.denoiser),
    }
    click.echo(json.dumps(info, indent=2))


@main.command()
def targets() -> None:
    """List the targets, their backend and status."""
    from .targets import list_targets

    for t in list_targets():
        status = "available" if t.status == "available" else f"planned ({t.planned_in})"
        click.echo(f"{t.name:<10} {t.backend['name']:<12} {status}\n           {t.description}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="calibration .safetensors file")
@click.option("--samples", default=20, show_default=True)
@click.option("--seed", default=10_000, show_default=True)
def calibrate(model: Path, out: Path, samples: int, seed: int) -> None:
    """Capture reference trajectories (x_t, t, class, output per step) for reuse with --calibration."""
    from calibration.capture import capture, save

    from .loading import load_program
    from .verify import evaluation_set

    try:
        program = load_program(model)
        seeds, classes = evaluation_set(samples, program.spec.conditioning.num_classes, seed)
        save(capture(program, seeds, classes, progress=lambda it: _progress(it, desc="calibration")), out)
    except OptimizerError as exc:
        _fail(exc)
    _log(f"wrote {out}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--seed", "seeds", type=int, multiple=True, default=(0,), show_default=True)
@click.option("--label", "labels", type=int, multiple=True, help="Class per seed (repeat; default 0).")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="PNG file")
def sample(artifact: Path, seeds: tuple[int, ...], labels: tuple[int, ...], out: Path) -> None:
    """Generate samples from an `optimize` output folder with ONNX Runtime."""
    import numpy as np
    from PIL import Image

    from backends.runner import PlanRunner

    from .fileio import write_atomic
    from .sampling import to_images

    try:
        runner = PlanRunner(artifact)
        classes = (list(labels) or [0] * len(seeds)) if runner.plan.conditioning.num_classes else None
        images = to_images(runner.sample(list(seeds), classes, progress=lambda it: _progress(it, desc="sample")))
    except OptimizerError as exc:
        _fail(exc)
    row = np.concatenate([(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in images], axis=1)
    picture = Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row)
    write_atomic(out, lambda tmp: picture.save(tmp, format="PNG"))
    _log(f"wrote {out}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="The original model (default: the source path recorded in plan.json).",
)
@click.option("--repeats", default=50, show_default=True, help="Timed denoiser calls (end to end: a quarter).")
@click.option("--images", default=1, show_default=True, help="Images per call (the denoiser batch is 2x with CFG).")
def bench(artifact: Path, model: Path | None, repeats: int, images: int) -> None:
    """Time an `optimize` output in ONNX Runtime against the original in torch and the original's fp32
    ONNX graph in ONNX Runtime, interleaved in one run."""
    import tempfile

    from backends.plan import read_plan
    from backends.runner import PlanRunner

    from .loading import load_program
    from .stages import lower, measure_latency

    try:
        plan = read_plan(artifact)
        source = plan.document["model"]["source"]
        program = load_program(model or source["path"])
        if program.source.digest != source["digest"]:
            raise OptimizerError(f"{program.source.path} is not the model this artifact was built from")
        if images < 1:
            raise ConfigError("--images must be >= 1")
        program = program.replace(plan=plan.sampling)
        with tempfile.TemporaryDirectory(prefix="bench-fp32-") as tmp:
            lower(program, Path(tmp))
            latency = measure_latency(program, PlanRunner(artifact), repeats, PlanRunner(Path(tmp)), images)
    except OptimizerError as exc:
        _fail(exc)
    click.echo(json.dumps(latency, indent=2))


def _comparison_command(name: str) -> Callable:
    """A side-by-side command: MODEL, --samples, --calibration-samples, --json-out."""

    def decorate(fn: Callable) -> Callable:
        fn = click.option(
            "--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON."
        )(fn)
        fn = click.option("--calibration-samples", default=20, show_default=True)(fn)
        fn = click.option("--samples", default=100, show_default=True, help="Evaluation seeds (classes cycle 0..N-1).")(
            fn
        )
        fn = click.argument("model", type=click.Path(path_type=Path))(fn)
        return main.command(name)(fn)

    return decorate


def _run_comparison(
    model: Path,
    samples: int,
    calibration_samples: int,
    json_out: Path | None,
    compare: Callable[[Any], list[dict[str, Any]]],
    table: Callable[[list[dict[str, Any]]], str],
) -> None:
    """Load, run `compare(program)`, write the rows as JSON if asked, print `table(rows)`."""
    from .fileio import write_json
    from .loading import load_program

    try:
        if samples < 2 or calibration_samples < 1:
            raise ConfigError("--samples must be >= 2 and --calibration-samples >= 1")
        rows = compare(load_program(model))
    except OptimizerError as exc:
        _fail(exc)
    if json_out is not None:
        write_json(json_out, rows)
    click.echo(table(rows))


@_comparison_command("quant-compare")
@click.option(
    "--rows",
    type=click.Choice(["all", "ours", "peers"]),
    default="all",
    show_default=True,
    help="Our configurations, the peer tools (ONNX Runtime, modelopt), or both.",
)
def quant_compare(model: Path, samples: int, calibration_samples: int, json_out: Path | None, rows: str) -> None:
    """Quantization side by side: our calibration vs naive ones, every format, same seeds (markdown table)."""
    from .quant_compare import compare_quantization, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        chosen = [] if rows == "peers" else None
        return compare_quantization(
            program, samples, calibration_samples, _progress, _log, rows=chosen, peers=rows != "ours"
        )

    _run_comparison(model, samples, calibration_samples, json_out, compare, markdown_table)


@_comparison_command("cache-compare")
def cache_compare(model: Path, samples: int, calibration_samples: int, json_out: Path | None) -> None:
    """Our searched cache schedules vs diffusers' cache hooks at matched FLOPs, same seeds (markdown)."""
    from .cache_compare import compare_caching, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_caching(program, samples, calibration_samples, _progress, _log)

    _run_comparison(model, samples, calibration_samples, json_out, compare, markdown_table)


@_comparison_command("prune-compare")
def prune_compare(model: Path, samples: int, calibration_samples: int, json_out: Path | None) -> None:
    """Pruning and layer removal: our criteria vs naive ones at equal compression, same seeds (markdown)."""
    from .prune_compare import compare_pruning, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_pruning(program, samples, calibration_samples, _progress, _log)

    _run_comparison(model, samples, calibration_samples, json_out, compare, markdown_table)
