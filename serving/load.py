"""Clients of a served `pipeline` model (serving.triton_repo) over HTTP, and a bounded load test:
concurrent clients, each sending one-image requests in turn, latency per request and throughput."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.errors import ConfigError
from serving.triton_repo import PIPELINE


def client_module() -> Any:
    try:
        import tritonclient.http as http
    except ImportError:
        raise ConfigError("serving clients need tritonclient: pip install 'tritonclient[http]'") from None
    return http


def check_server(url: str) -> None:
    """A clear error unless a Triton server at `url` answers and its `pipeline` model is ready."""
    try:
        ready = client_module().InferenceServerClient(url, connection_timeout=10).is_model_ready(PIPELINE)
    except Exception as exc:  # refused, unresolvable, not HTTP: all bad input here
        raise ConfigError(f"no Triton server answers at {url} ({str(exc)[:120]})") from None
    if not ready:
        raise ConfigError(f"the Triton server at {url} has no ready '{PIPELINE}' model (optimize export-triton)")


def request_inputs(seed: int, condition: int | str | None) -> list[Any]:
    """The pipeline model's inputs for one image: seed, and a class label (int) or a prompt (str)."""
    http = client_module()
    seed_input = http.InferInput("seed", [1, 1], "INT64")
    seed_input.set_data_from_numpy(np.array([[seed]], np.int64))
    if condition is None:
        return [seed_input]
    if isinstance(condition, str):
        cond = http.InferInput("prompt", [1, 1], "BYTES")
        cond.set_data_from_numpy(np.array([[condition.encode("utf-8")]], dtype=np.object_))
    else:
        cond = http.InferInput("class_label", [1, 1], "INT64")
        cond.set_data_from_numpy(np.array([[condition]], np.int64))
    return [seed_input, cond]


def infer(client: Any, seed: int, condition: int | str | None) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [1, H, W, C], latents [1, C, h, w]) of one request to `client`'s pipeline model."""
    response = client.infer(PIPELINE, request_inputs(seed, condition))
    return response.as_numpy("image"), response.as_numpy("latents")


def policy_inputs(seed: int, episode: int, decision: int, observation: dict[str, np.ndarray]) -> list[Any]:
    """A policy's pipeline model inputs for one decision: seed, episode, decision index and the observation
    history (name -> [n_obs_steps, dim], raw units)."""
    http = client_module()
    inputs = []
    for name, value in (("seed", seed), ("episode", episode), ("decision", decision)):
        tensor = http.InferInput(name, [1, 1], "INT64")
        tensor.set_data_from_numpy(np.array([[value]], np.int64))
        inputs.append(tensor)
    for name, array in observation.items():
        batch = np.ascontiguousarray(array, np.float32)[None]
        tensor = http.InferInput(name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        inputs.append(tensor)
    return inputs


def infer_action(client: Any, seed: int, episode: int, decision: int, observation: dict[str, np.ndarray]) -> np.ndarray:
    """The action chunk ([1, horizon, action_dim], raw units) of one decision sent to a served policy."""
    return client.infer(PIPELINE, policy_inputs(seed, episode, decision, observation)).as_numpy("action")


def load_test(
    url: str, conditions: Sequence[int | str | None], clients: int, requests: int, first_seed: int = 0
) -> dict[str, Any]:
    """`clients` threads, each with its own connection, send `requests` requests one after another
    (client k, request i: seed first_seed + k * requests + i, condition cycling through `conditions`)."""
    http = client_module()
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        client = http.InferenceServerClient(url, connection_timeout=300, network_timeout=300)
        for i in range(requests):
            n = k * requests + i
            start = time.perf_counter()
            try:
                infer(client, first_seed + n, conditions[n % len(conditions)])
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception as exc:  # counted and reported, never raised: the run goes on
                with lock:
                    failures.append(f"client {k} request {i}: {str(exc)[:200]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = sorted(x * 1e3 for x in latencies)
    percentile = (lambda q: float(np.percentile(ms, q))) if ms else (lambda q: None)  # none succeeded
    return {
        "clients": clients,
        "requests": clients * requests,
        "succeeded": len(latencies),
        "failed": len(failures),
        "failures": failures[:5],
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "mean_ms": statistics.fmean(ms) if ms else None,
        "wall_s": wall,
        "images_per_s": len(latencies) / wall,
    }
