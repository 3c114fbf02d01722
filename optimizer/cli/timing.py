"""`optimize bench` (an artifact timed against its original) and `optimize attention-sweep`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from core.errors import ConfigError
from core.limits import MAX_REPEATS
from optimizer.cli.app import ALLOW_LARGE, SEED, artifact_errors, log, main

SCALE_GEOMETRIES = (
    "dit-b2",
    "dit-b2-512",
    "dit-xl2",
    "unet-sd",
)  # bench.scale.GEOMETRIES (named here so --help needs no torch import)
SCALE_REPEATS = 5  # whole loops at a realistic size take seconds each


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="The original model (default: the source path recorded in plan.json).",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, MAX_REPEATS),
    default=50,
    show_default=True,
    help="Timed denoiser calls (end to end: a quarter).",
)
@click.option(
    "--images",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Images per call (the denoiser batch is 2x with CFG).",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the timings as JSON.")
@click.option(
    "--scale",
    type=click.Choice(sorted(SCALE_GEOMETRIES)),
    default=None,
    help="Replay the artifact's decisions on this realistic geometry (random weights) and time its whole loop "
    f"against the same geometry's original, side by side (--repeats loops each, at most {SCALE_REPEATS}).",
)
@ALLOW_LARGE
def bench(
    artifact: Path,
    model: Path | None,
    repeats: int,
    images: int,
    json_out: Path | None,
    scale: str | None,
    allow_large: bool,
) -> None:
    """Time an `optimize` output on its backend against the original in torch and the original's fp32
    graph on the same backend (each on the original's own loop, as the report times them), interleaved in
    one run; or, with --scale, its decisions at a realistic size."""
    import tempfile

    from backends.plan import original_loop, read_plan
    from backends.registry import get_backend
    from core.fileio import write_json
    from core.loading import load_program
    from core.outputs import check_out_file
    from optimizer.prepare import check_job_memory
    from optimizer.report import latency_lines
    from verify.latency import measure_latency

    if scale is not None:
        _bench_scale(artifact, scale, repeats)
        return
    if json_out is not None:
        check_out_file(json_out, [artifact], "--json-out")
    plan = read_plan(artifact)
    backend = get_backend(plan.backend)
    source = plan.document["model"]["source"]
    program = load_program(model or source["path"], allow_large)
    if program.source.digest != source["digest"]:
        raise ConfigError(f"{program.source.path} is not the model this artifact was built from")
    original = original_loop(plan.document, str(artifact / "plan.json"))
    if original is None:
        log("this artifact does not record the original's loop: the baselines run the artifact's loop")
    program = program.replace(plan=original or plan.sampling)
    check_job_memory(program, images, allow_large)
    with tempfile.TemporaryDirectory(prefix="bench-fp32-") as tmp:
        backend.lower(program, Path(tmp))
        with artifact_errors(artifact, backend):
            latency = measure_latency(program, backend.runner(artifact), repeats, backend.runner(Path(tmp)), images)
    for line in latency_lines(latency, "cuda" if plan.backend.get("name") == "tensorrt" else "cpu"):
        click.echo(line)
    if json_out is not None:
        write_json(json_out, latency)


@main.command("attention-sweep")
@click.option(
    "--tokens",
    "sides",
    type=click.IntRange(4, 128),
    multiple=True,
    default=(16, 32, 48, 64),
    show_default=True,
    help="Token grid sides to sweep (16: 256 tokens, 64: 4096).",
)
@click.option("--heads", type=click.IntRange(1, 64), default=12, show_default=True)
@click.option("--head-dim", type=click.IntRange(8, 256), default=64, show_default=True)
@click.option(
    "--radius",
    "radii",
    type=click.FloatRange(1, 64),
    multiple=True,
    default=(4.0, 8.0, 16.0),
    show_default=True,
    help="Local attention window radii (one variant each).",
)
@click.option("--tile", type=click.IntRange(1, 64), default=8, show_default=True, help="Local attention query tile.")
@click.option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows here.")
def attention_sweep(
    sides: tuple[int, ...],
    heads: int,
    head_dim: int,
    radii: tuple[float, ...],
    tile: int,
    repeats: int,
    json_out: Path | None,
) -> None:
    """One DiT block (random weights) at growing token counts: softmax self-attention vs linear, linear +
    conv and local attention, lowered and timed side by side in ONNX Runtime; attention FLOPs per image."""
    from bench.attention_sweep import check_memory, markdown, sweep
    from core.fileio import write_json
    from core.limits import available_memory
    from core.outputs import check_out_file

    if json_out is not None:
        check_out_file(json_out, [], "--json-out")
    check_memory(sides, heads, head_dim, radii, tile, available_memory())
    rows = sweep(sides, heads, head_dim, radii, tile, repeats, log)
    if json_out is not None:
        write_json(json_out, rows)
    click.echo(markdown(rows))


def _bench_scale(artifact: Path, geometry: str, repeats: int) -> None:
    from backends.plan import read_plan
    from bench.scale import GEOMETRIES, compare_at_scale
    from core.validate import read_json_object

    plan = read_plan(artifact)  # the folder is an artifact of ours, checked
    report = read_json_object(artifact / "report.json", ConfigError, "report")
    result = compare_at_scale(report, plan.backend, GEOMETRIES[geometry], min(repeats, SCALE_REPEATS), log)
    click.echo(json.dumps(result, indent=2))


@main.command("policy-latency")
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="The original policy (default: the source path recorded in plan.json).",
)
@click.option("--env", "environment", default=None, help="Environment (default: the one plan.json records).")
@click.option("--repeats", type=click.IntRange(1, MAX_REPEATS), default=12, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the timings as JSON.")
@click.option(
    "--threads",
    type=click.IntRange(0, os.cpu_count() or 1),
    default=None,
    help="The artifact's intra-op threads (ONNX Runtime; 0: its default; default: as plan.json's backend says).",
)
def policy_latency(
    artifact: Path,
    model: Path | None,
    environment: str | None,
    repeats: int,
    json_out: Path | None,
    threads: int | None,
):
    """Time a policy artifact per control decision at batch 1 against the original as LeRobot runs it (its own
    plan in torch fp32, and DDIM 10), interleaved in one run."""
    from backends.plan import read_plan
    from backends.registry import get_backend
    from bench.policy_latency import lines, measure
    from core.fileio import write_json
    from core.loading import load_program
    from core.outputs import check_out_file

    if json_out is not None:
        check_out_file(json_out, [artifact], "--json-out")
    plan = read_plan(artifact)
    if plan.chunking is None:
        raise ConfigError(f"{artifact}: not a policy's artifact (plan.json records no policy)")
    source = plan.document["model"]["source"]
    program = load_program(model or source["path"])
    if program.source.digest != source["digest"]:
        raise ConfigError(f"{program.source.path} is not the model this artifact was built from")
    env_name = environment or plan.environment or program.stages.environment
    if env_name is None:
        raise ConfigError("the artifact records no environment: pass --env")
    backend = get_backend(plan.backend if threads is None else {**plan.backend, "threads": threads})
    with artifact_errors(artifact, backend):
        result = measure(program, backend.runner(artifact), env_name, repeats)
    result["artifact_threads"] = threads
    for line in lines(result):
        click.echo(line)
    if json_out is not None:
        write_json(json_out, result)


@main.command("policy-loops")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--loop", "loops", multiple=True, required=True, help="A loop spec (repeat): ddim:10, ddpm:16:30, ...")
@click.option(
    "--recipe",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="A JSON list of pass steps run first (e.g. a distillation), as a target's recipe.",
)
@click.option("--env", "environment", default=None, help="Environment (default: the one the policy names).")
@click.option("--episodes", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="The recipe's --seed, as optimize takes it.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
def policy_loops(
    model: Path,
    loops: tuple[str, ...],
    recipe: Path | None,
    environment: str | None,
    episodes: int,
    seed: int,
    json_out: Path | None,
):
    """A policy's success under other loops (samplers, step counts, warm starts; a distilled student's own step
    counts after --recipe), closed loop in torch on the judge's episodes, one row per --loop."""
    import torch

    from bench.policy_loops import judge_loops, loop_plan
    from core.environments.observations import attach
    from core.fileio import write_json
    from core.loading import load_program
    from core.outputs import check_out_file, input_paths
    from optimizer.cli.app import show_progress
    from passes.analyses import Analyses
    from passes.base import Context
    from passes.manager import plan_passes, run_passes

    if json_out is not None:
        check_out_file(json_out, input_paths(model), "--json-out")
    program, planned, capabilities = load_program(model), None, frozenset({"fp32"})
    if recipe is not None:  # the recipe and the loops checked before the observation set's episodes run
        try:
            steps = json.loads(recipe.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--recipe {recipe}: not a JSON file ({exc})") from None
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise ConfigError(f"--recipe {recipe}: must be a JSON list of pass steps ({{'pass': ..., 'config': ...}})")
        planned = plan_passes(steps, capabilities, program=program)
    else:
        for spec in loops:
            loop_plan(program, spec)
    program = attach(program, environment, str(model))
    if planned is not None:
        rng = torch.Generator().manual_seed(seed)
        ctx = Context(program, Analyses(), capabilities, rng=rng, seed=seed, progress=show_progress)
        program = run_passes(program, planned, ctx)
    assert program.stages.environment is not None  # attach() set it
    rows = judge_loops(program, program.stages.environment, loops, episodes, log)
    if json_out is not None:
        write_json(json_out, rows)
    click.echo(json.dumps(rows, indent=2))
