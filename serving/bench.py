"""`optimize bench-serving`: the in-process runner's rate measured first (one image per call, and
batches), then the artifact exported and served by a real Triton server on this machine (or one already
serving it), checked against the runner and loaded by concurrent clients, in the same run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends.registry import open_runner
from core.errors import ConfigError
from core.pixels import to_pixels
from serving.load import check_server, client_module, infer, load_test
from serving.local_server import TritonServer
from serving.triton_repo import export_repository

CHECKED_SEEDS = 4
IN_PROCESS_IMAGES = 40


def runner_images(runner: Any, seeds: Sequence[int], conditions: Sequence[Any] | None) -> np.ndarray:
    """What `optimize sample` writes for these seeds, as the pipeline model's uint8 [N, H, W, C]."""
    return to_pixels(runner.decode(runner.sample(list(seeds), conditions)))


def request_conditions(runner: Any, prompts: Sequence[str]) -> list[Any]:
    """Class labels cycling over the classes, the given prompts, or None (unconditional)."""
    conditioning = runner.plan.conditioning
    if conditioning.text:
        if not prompts:
            raise ConfigError("a text-to-image artifact needs prompts to send (--prompt, repeat)")
        return list(prompts)
    if prompts:
        raise ConfigError("--prompt is for text-to-image artifacts; this one is not text-conditioned")
    return list(range(conditioning.num_classes)) if conditioning.num_classes else [None]


def in_process_rates(runner: Any, conditions: list[Any], images: int, batch: int) -> dict[str, Any]:
    """The in-process runner's images/s over `images` images: one per call (a process calling `optimize
    sample` per request) and `batch` per call (what dynamic batching can at best reach without overhead)."""
    rates = {}
    for name, size in (("one_at_a_time", 1), (f"batches_of_{batch}", batch)):
        start = time.perf_counter()
        for first in range(0, images, size):
            seeds = list(range(first, min(first + size, images)))
            batch_conditions = [conditions[s % len(conditions)] for s in seeds]
            runner_images(runner, seeds, None if batch_conditions[0] is None else batch_conditions)
        seconds = time.perf_counter() - start
        rates[name] = {"images": images, "ms_per_image": seconds / images * 1e3, "images_per_s": images / seconds}
    return rates


def bench_served(
    url: str, runner: Any, conditions: list[Any], clients: int, requests: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Against the server at `url` serving the runner's artifact: served vs in-process images on the first
    seeds, then the load test."""
    client = client_module().InferenceServerClient(url, network_timeout=300)
    differences = []
    for seed in range(CHECKED_SEEDS):
        condition = conditions[seed % len(conditions)]
        served, _ = infer(client, seed, condition)
        expected = runner_images(runner, [seed], None if condition is None else [condition])
        differences.append(int(np.abs(served.astype(int) - expected.astype(int)).max()))
    log(f"served vs in-process runner, {CHECKED_SEEDS} seeds: max pixel difference {max(differences)}")
    log(f"load: {clients} clients x {requests} requests ...")
    load = load_test(url, conditions, clients, requests, first_seed=CHECKED_SEEDS)
    return {"served_vs_runner_max_pixel_difference": max(differences), "load": load}


def bench_serving(
    artifact: Path,
    env: Path | None,
    clients: int,
    requests: int,
    max_batch: int,
    instances: int,
    prompts: Sequence[str] = (),
    log: Callable[[str], None] = print,
    url: str | None = None,
) -> dict[str, Any]:
    """The in-process runner's rates, measured first (no server running unless `url` is given); then
    `artifact` exported and served from `env` (optimize serving-env), or the server at `url` that
    already serves it; then bench_served."""
    if url is not None:
        check_server(url)
    runner = open_runner(artifact)
    conditions = request_conditions(runner, prompts)
    log("in-process runner: one image per call, then batches ...")
    rates = in_process_rates(runner, conditions, min(clients * requests, IN_PROCESS_IMAGES), max_batch)
    result = {"artifact": str(artifact), "in_process": rates}
    if url is not None:
        return {**result, "server": {"url": url}, **bench_served(url, runner, conditions, clients, requests, log)}
    if env is None:
        raise ConfigError("bench-serving needs a server environment or the URL of a running server")
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        repo = Path(tmp) / "repo"
        export_repository(artifact, repo, graphs="python", max_batch=max_batch, instances=instances)
        log(f"starting tritonserver on {repo} ...")
        with TritonServer(env, repo, Path(tmp)) as server:
            measured = bench_served(server.url, runner, conditions, clients, requests, log)
    server_info = {"graphs": "onnxruntime in Python-backend models", "max_batch": max_batch, "instances": instances}
    return {**result, "server": server_info, **measured}
