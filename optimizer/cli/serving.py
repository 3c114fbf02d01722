"""`optimize export-triton`, `optimize serving-env`, `optimize bench-serving`: an artifact served by Triton."""

from __future__ import annotations

import json
from pathlib import Path

import click

from core.errors import ConfigError
from optimizer.cli.app import log, main


@main.command("export-triton")
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--repo", type=click.Path(path_type=Path), required=True, help="New folder for the repository.")
@click.option(
    "--graphs",
    type=click.Choice(["onnxruntime", "python", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="Graph models on the server's onnxruntime backend, run by onnxruntime inside Python-backend "
    "models (servers without that backend, e.g. nvidia-pytriton's), or the denoiser graphs as the "
    "TensorRT engines a GPU target built (tensorrt_plan).",
)
@click.option("--max-batch", default=8, show_default=True, help="Images the pipeline batches from its queue.")
@click.option("--instances", default=1, show_default=True, help="Instances of each model.")
def export_triton(artifact: Path, repo: Path, graphs: str, max_batch: int, instances: int) -> None:
    """Export an `optimize` output as a Triton model repository: the graphs, and a `pipeline` model that
    runs the whole plan (requests: seed + class label or prompt; responses: image, latents)."""
    from serving.triton_repo import export_repository

    written = export_repository(artifact, repo, graphs, max_batch, instances)
    log(f"wrote {repo}/ (models: {', '.join(written['models'])})")


@main.command("serving-env")
@click.argument("folder", type=click.Path(path_type=Path))
def serving_env(folder: Path) -> None:
    """Create a Python environment with a Triton server (nvidia-pytriton's) that serves exported
    repositories on this machine, CPU included (what the serving tests use)."""
    from serving.local_server import create_env

    log(f"python: {create_env(folder, log)}")


@main.command("bench-serving")
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--env",
    type=click.Path(path_type=Path, file_okay=False),
    default=".venv-triton",
    show_default=True,
    help="The server environment (optimize serving-env DIR).",
)
@click.option("--clients", type=click.IntRange(1, 64), default=8, show_default=True, help="Concurrent clients.")
@click.option("--requests", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Requests per client.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option(
    "--instances",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Instances of each model (graph models run one ORT thread each: 2 keeps 2 cores busy).",
)
@click.option("--prompt", "prompts", multiple=True, help="Prompts to send to a text-to-image artifact (repeat).")
@click.option("--url", default=None, help="HOST:PORT of a running Triton server that already serves ARTIFACT (HTTP).")
@click.option(
    "--episodes",
    type=click.IntRange(1, 1000),
    default=2,
    show_default=True,
    help="A policy's artifact: whole episodes driven through the server, one decision per request.",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the result here.")
def bench_serving(
    artifact: Path,
    env: Path,
    clients: int,
    requests: int,
    max_batch: int,
    instances: int,
    prompts: tuple[str, ...],
    url: str | None,
    episodes: int,
    json_out: Path | None,
) -> None:
    """Serve an `optimize` output on a local Triton server (graphs in onnxruntime inside Python-backend
    models) or use one that serves it (--url), check served images against the in-process runner, and
    load it with concurrent clients; exit 1 when a request failed. A policy's artifact: its environment's
    episodes through the server at batch 1, each decision checked against the runner, p50/p99 per decision."""
    from backends.plan import read_plan
    from core.fileio import write_json
    from core.outputs import check_out_file
    from serving.bench import bench_serving as run_bench
    from serving.policy_bench import bench_policy_serving

    if json_out is not None:
        check_out_file(json_out, [artifact], "--json-out")
    if url is None and not (env / "bin" / "python").exists():
        raise ConfigError(f"no server environment at {env}: create it with 'optimize serving-env {env}'")
    if read_plan(artifact).chunking is not None:
        result = bench_policy_serving(artifact, env, episodes, log, url)
        failed = result["served_vs_runner_max_action_difference"] != 0.0
    else:
        result = run_bench(artifact, env, clients, requests, max_batch, instances, prompts, log, url)
        load = result["load"]
        rates = ", ".join(f"{name} {rate['images_per_s']:.2f}" for name, rate in result["in_process"].items())
        if load["succeeded"]:
            log(
                f"{load['requests']} requests, {load['failed']} failed: p50 {load['p50_ms']:.1f} ms, "
                f"p90 {load['p90_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, {load['images_per_s']:.2f} images/s "
                f"(in-process runner, images/s: {rates})"
            )
        else:
            log(f"all {load['requests']} requests failed, e.g. {load['failures'][0]}")
        failed = bool(load["failed"])
    if json_out is not None:
        write_json(json_out, result)
    click.echo(json.dumps(result, indent=2))
    if failed:
        raise SystemExit(1)
