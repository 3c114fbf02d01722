"""`optimize bench-serving` on a policy's artifact: whole episodes in the policy's environment driven through
the served `pipeline` model one decision at a time (batch 1, a robot's control loop), each decision's served
chunk checked against the in-process runner's for the same seed, episode and observations (warm-started
chunks included), and the latency of every request: p50 and p99 per control decision, the control rate."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from backends.registry import open_runner
from core.environments import programs, rollout
from core.errors import ConfigError
from serving.load import client_module, infer_action
from serving.local_server import TritonServer
from serving.triton_repo import export_repository
from verify.judges.closed_loop import EPISODE_SEED  # the closed-loop judge's episodes

NOISE_SEED = 900_000


def served_episodes(url: str, runner: Any, env_name: str, episodes: int, log: Callable[[str], None]) -> dict[str, Any]:
    """`episodes` episodes, one after another, each decision a request; the in-process runner's policy run on
    the same inputs beside it (not timed)."""
    chunking = runner.plan.chunking
    client = client_module().InferenceServerClient(url, network_timeout=300)
    in_process = programs.as_policy(runner.sample, runner.decode, NOISE_SEED, runner.plan.sampling, chunking)
    latencies: list[float] = []
    differences: list[float] = []

    def served(decision: int, ids: np.ndarray, observed: dict[str, np.ndarray]) -> np.ndarray:
        chunks = []
        for j, episode in enumerate(ids):
            seed = NOISE_SEED + decision * programs.STRIDE + int(episode)
            start = time.perf_counter()
            chunk = infer_action(client, seed, int(episode), decision, {k: v[j] for k, v in observed.items()})
            latencies.append(time.perf_counter() - start)
            chunks.append(chunk[0])
        got = np.stack(chunks)
        differences.append(float(np.abs(got - in_process(decision, ids, observed)).max()))
        return got

    done = rollout.run(env_name, served, list(range(EPISODE_SEED, EPISODE_SEED + episodes)), chunking)
    ms = np.array(latencies) * 1e3
    log(f"{len(ms)} decisions served: p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms")
    return {
        "episodes": episodes,
        "decisions": len(ms),
        "success_rate": done.success_rate,
        "served_vs_runner_max_action_difference": max(differences),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "decisions_per_s_at_p50": 1000.0 / float(np.percentile(ms, 50)),
    }


def bench_policy_serving(
    artifact: Path, env: Path | None, episodes: int, log: Callable[[str], None], url: str | None = None
) -> dict[str, Any]:
    """The policy artifact served from `env` (or the server at `url` that serves it), then served_episodes."""
    runner = open_runner(artifact)
    env_name = runner.plan.environment
    if env_name is None:
        raise ConfigError(f"{artifact}: the policy's plan.json records no environment to act in")
    result: dict[str, Any] = {"artifact": str(artifact), "environment": env_name}
    if url is not None:
        return {**result, "server": {"url": url}, **served_episodes(url, runner, env_name, episodes, log)}
    if env is None:
        raise ConfigError("bench-serving needs a server environment or the URL of a running server")
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        repo = Path(tmp) / "repo"
        export_repository(artifact, repo, graphs="python", max_batch=1)
        log(f"starting tritonserver on {repo} ...")
        with TritonServer(env, repo, Path(tmp)) as server:
            measured = served_episodes(server.url, runner, env_name, episodes, log)
    return {**result, "server": {"graphs": "onnxruntime in Python-backend models", "max_batch": 1}, **measured}
