"""The side-by-side comparisons: `quant-compare`, `cache-compare`, `prune-compare`, `judge-compare`,
`linearize-compare`, `steps-compare` (one table each, the same seeds for every row)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from core.errors import ConfigError
from core.limits import MAX_SAMPLES
from optimizer.cli.app import ALLOW_LARGE, PROMPTS, SAMPLES, judge_options, log, main, show_progress


def _comparison_command(name: str) -> Callable:
    """A side-by-side command: MODEL, --samples, --calibration-samples, --json-out, --allow-large."""

    def decorate(fn: Callable) -> Callable:
        fn = ALLOW_LARGE(fn)
        fn = click.option(
            "--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON."
        )(fn)
        fn = click.option("--calibration-samples", type=SAMPLES, default=20, show_default=True)(fn)
        fn = click.option(
            "--samples",
            type=click.IntRange(2, MAX_SAMPLES),
            default=100,
            show_default=True,
            help="Evaluation seeds (classes cycle 0..N-1).",
        )(fn)
        fn = click.argument("model", type=click.Path(path_type=Path))(fn)
        return main.command(name)(fn)

    return decorate


def _run_comparison(
    model: Path,
    samples: int,
    calibration_samples: int,
    json_out: Path | None,
    allow_large: bool,
    compare: Callable[[Any], list[dict[str, Any]]],
    table: Callable[[list[dict[str, Any]]], str],
) -> None:
    """Load, run `compare(program)`, write the rows as JSON if asked, print `table(rows)`."""
    from core.fileio import write_json
    from core.loading import load_program
    from core.outputs import check_out_file, input_paths
    from optimizer.prepare import check_job_memory

    if json_out is not None:
        check_out_file(json_out, input_paths(model), "--json-out")
    program = load_program(model, allow_large)
    check_job_memory(program, max(samples, calibration_samples), allow_large)
    rows = compare(program)
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
def quant_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool, rows: str
) -> None:
    """Quantization side by side: our calibration vs naive ones, every format, same seeds (markdown table)."""
    from bench.quant_compare import compare_quantization, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        chosen: list[Any] | None = [] if rows == "peers" else None
        return compare_quantization(
            program, samples, calibration_samples, show_progress, log, rows=chosen, peers=rows != "ours"
        )

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


@_comparison_command("cache-compare")
def cache_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool
) -> None:
    """Our searched cache schedules vs diffusers' cache hooks at matched FLOPs, same seeds (markdown)."""
    from bench.cache_compare import compare_caching, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_caching(program, samples, calibration_samples, show_progress, log)

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


@_comparison_command("prune-compare")
def prune_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool
) -> None:
    """Pruning and layer removal: our criteria vs naive ones at equal compression, same seeds (markdown)."""
    from bench.prune_compare import compare_pruning, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_pruning(program, samples, calibration_samples, show_progress, log)

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


@main.command("judge-compare")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--samples", type=click.IntRange(2, MAX_SAMPLES), default=100, show_default=True)
@click.option("--nulls", type=click.IntRange(0, 64), default=8, show_default=True, help="Fresh draws of the original.")
@click.option(
    "--seed-sets",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="Judge the candidates on this many disjoint evaluation sets (the spread one set's gate decides by chance).",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
@judge_options
@PROMPTS
@ALLOW_LARGE
def judge_compare(
    model: Path,
    samples: int,
    nulls: int,
    seed_sets: int,
    json_out: Path | None,
    clip: Path | None,
    inception: Path | None,
    environment: str | None,
    episodes: int,
    prompts: Path | None,
    allow_large: bool,
) -> None:
    """Every judge that applies to MODEL on graded candidates (fresh draws of the original, INT8 weights,
    weights + 5% and + 20% noise, INT4 weights, half the steps): distribution ratios and their order."""
    from bench.judge_compare import compare_judges, markdown_table
    from core.fileio import write_json
    from core.outputs import check_out_file, input_paths
    from optimizer.prepare import check_job_memory, load_for_job
    from verify.judges import JudgeOptions, plan_judges

    if json_out is not None:
        check_out_file(json_out, input_paths(model), "--json-out")
    options = JudgeOptions(clip=clip, inception=inception, episodes=episodes, environment=environment)
    program = load_for_job(model, allow_large, prompts)
    plan_judges(program, options)  # a bad feature model: one line before any work
    if seed_sets * samples > MAX_SAMPLES:
        raise ConfigError(f"judge-compare: --seed-sets x --samples must be at most {MAX_SAMPLES}")
    check_job_memory(program, samples, allow_large)
    rows = compare_judges(program, samples, nulls, options, log, seed_sets)
    if json_out is not None:
        write_json(json_out, rows)
    click.echo(markdown_table(rows))


@_comparison_command("linearize-compare")
def linearize_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool
) -> None:
    """Attention linearization as the pass does it vs the naive variants (undistilled, every block), each
    mechanism, same seeds, lowered and timed side by side in ONNX Runtime (markdown table)."""
    from bench.linearize_compare import compare_linearization, markdown_table

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_linearization(program, samples, calibration_samples, show_progress, log)

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)


@_comparison_command("steps-compare")
@click.option("--nfe", type=click.IntRange(1, 64), default=4, show_default=True, help="Network evaluations per image.")
def steps_compare(
    model: Path, samples: int, calibration_samples: int, json_out: Path | None, allow_large: bool, nfe: int
) -> None:
    """Step reduction at equal network evaluations: plain DDIM, searched schedules and the distilled
    students (cpu-steps recipe), fidelity and whole-loop ORT latency side by side (markdown)."""
    from bench.steps_compare import compare_steps, markdown_table, rows_for
    from optimizer.targets import get_target

    recipe = [dict(step) for step in get_target("cpu-steps").recipe]
    for step in recipe:
        if step["pass"] == "progressive_distill":
            step["config"] = {**step.get("config", {}), "steps": nfe}

    def compare(program: Any) -> list[dict[str, Any]]:
        return compare_steps(program, rows_for(nfe, recipe), samples, calibration_samples, show_progress, log)

    _run_comparison(model, samples, calibration_samples, json_out, allow_large, compare, markdown_table)
