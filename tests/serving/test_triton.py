"""Issue 17: an exported Triton repository on a real `tritonserver` (nvidia-pytriton's binary, Python
backend; its graphs run by onnxruntime inside Python-backend models, since that server has no onnxruntime
backend). The server environment is `.venv-triton` (`optimize serving-env .venv-triton`; .ci/run makes it)."""

import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import lower

from backends.registry import open_runner
from core.limits import MAX_SEED
from core.sampling import to_images
from serving.local_server import PROJECT, TritonServer
from serving.triton_repo import export_repository

ENV = Path(os.environ.get("TRITON_ENV", PROJECT / ".venv-triton"))
pytestmark = pytest.mark.skipif(
    not (ENV / "bin" / "python").exists(), reason=f"no Triton server environment at {ENV}: optimize serving-env {ENV}"
)
http = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def served(tiny_digits_program, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    lower(tiny_digits_program, root / "artifact")
    export_repository(root / "artifact", root / "repo", graphs="python", max_batch=8)
    with TritonServer(ENV, root / "repo", root) as server:
        yield server, root / "artifact"
    assert not server.alive()


def request(client, seed, label, dtype=np.int64, shape=(1, 1)):
    inputs = []
    for name, value in (("seed", seed), ("class_label", label)):
        if value is None:
            continue
        tensor = http.InferInput(name, list(shape), "INT64" if dtype == np.int64 else "FP32")
        tensor.set_data_from_numpy(np.full(shape, value, dtype))
        inputs.append(tensor)
    return client.infer("pipeline", inputs)


def runner_images(artifact, seeds, labels):
    runner = open_runner(artifact)
    images = to_images(runner.decode(runner.sample(seeds, labels)))
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_served_images_equal_optimize_sample(served):
    server, artifact = served
    client = http.InferenceServerClient(server.url)
    seeds, labels = [0, 1, 2], [3, 5, 7]
    for seed, label in zip(seeds, labels, strict=True):
        response = request(client, seed, label)
        image, latents = response.as_numpy("image"), response.as_numpy("latents")
        assert image.dtype == np.uint8 and latents.shape == (1, 1, 16, 16)
        np.testing.assert_array_equal(image, runner_images(artifact, [seed], [label]))
    # Batched by the server or not, a seed gives its image (within one level: batch-size numerics).
    batched = runner_images(artifact, seeds, labels)
    served_images = np.concatenate(
        [request(client, s, c).as_numpy("image") for s, c in zip(seeds, labels, strict=True)]
    )
    assert np.abs(batched.astype(int) - served_images.astype(int)).max() <= 1


def test_concurrent_clients_all_succeed(served):
    """8 clients x 10 requests (the full 8 x 50 is a benchmark): no failure; latency percentiles."""
    server, _ = served
    latencies, failures = [], []

    def client_loop(k):
        client = http.InferenceServerClient(server.url)
        for i in range(10):
            start = time.perf_counter()
            try:
                request(client, 1000 * k + i, (k + i) % 10)
                latencies.append(time.perf_counter() - start)
            except Exception as exc:  # counted, then asserted
                failures.append(str(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    assert not failures and len(latencies) == 80
    p50, p99 = statistics.median(latencies), np.percentile(latencies, 99)
    print(f"80 requests: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, {80 / wall:.1f} images/s")
    assert 0 < p50 <= p99


@pytest.mark.parametrize(
    "seed, label, dtype, shape, message",
    [
        (-1, 3, np.int64, (1, 1), "one seed per request"),
        (MAX_SEED, 3, np.int64, (1, 1), "one seed per request"),
        (1, 10, np.int64, (1, 1), "class_label 10 outside 0..9"),
        (1, 3, np.float32, (1, 1), "data-type"),
        (1, 3, np.int64, (1, 2), "shape"),
        (1, 3, np.int64, (9, 1), "batch"),
        (None, 3, np.int64, (1, 1), "seed"),
    ],
    ids=["negative-seed", "seed-too-large", "unknown-class", "float-seed", "wrong-shape", "batch-over-max", "no-seed"],
)
def test_malformed_requests_get_a_clean_error_and_the_server_stays_up(served, seed, label, dtype, shape, message):
    server, _ = served
    client = http.InferenceServerClient(server.url)
    with pytest.raises(Exception, match="(?i)" + message):
        request(client, seed, label, dtype, shape)
    assert server.alive() and client.is_server_ready()
    assert request(client, 5, 2).as_numpy("image").shape == (1, 16, 16, 1)
