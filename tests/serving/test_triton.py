"""Issue 17: an exported Triton repository on a real `tritonserver` (nvidia-pytriton's binary, Python
backend; its graphs run by onnxruntime inside Python-backend models, since that server has no onnxruntime
backend). The server environment is `.venv-triton` (`optimize serving-env .venv-triton`; .ci/run makes it)."""

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import lower

from backends.registry import open_runner
from core.limits import MAX_SEED
from core.stages import MAX_PROMPT_CHARS
from optimizer.cli import main
from serving.bench import runner_images as bench_images
from serving.load import infer
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
    return bench_images(open_runner(artifact), seeds, labels)


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


def test_bench_serving_loads_a_running_server_with_concurrent_clients(served, tmp_path):
    """optimize bench-serving --url, 8 clients x 10 requests (8 x 50 on the shipped models: BENCHMARKS.md)."""
    server, artifact = served
    args = ["bench-serving", artifact, "--url", server.url, "--clients", 8, "--requests", 10]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--json-out", tmp_path / "b.json"]])
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "b.json").read_text())
    load = measured["load"]
    assert load["failed"] == 0 and load["succeeded"] == load["requests"] == 80, load["failures"]
    assert 0 < load["p50_ms"] <= load["p90_ms"] <= load["p99_ms"] and load["images_per_s"] > 0
    assert measured["served_vs_runner_max_pixel_difference"] == 0
    assert set(measured["in_process"]) == {"one_at_a_time", "batches_of_8"} and "p99" in result.output
    assert all(rate["images"] == 40 and rate["images_per_s"] > 0 for rate in measured["in_process"].values())


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


@contextlib.contextmanager
def serve_and_compare(artifact, root, requests):
    """Export `artifact`, serve it, and check each (seed, condition) request's image and latents
    against the in-process runner's, bit for bit; the server is stopped before returning."""
    export_repository(artifact, root / "repo", graphs="python", max_batch=4)
    runner = open_runner(artifact)
    with TritonServer(ENV, root / "repo", root) as server:
        client = http.InferenceServerClient(server.url)
        for seed, condition in requests:
            image, latents = infer(client, seed, condition)
            final = runner.sample([seed], [condition])
            np.testing.assert_array_equal(latents, final.numpy())
            np.testing.assert_array_equal(image, runner_images(artifact, [seed], [condition]))
        yield server, client
    assert not server.alive()


def test_a_cached_text_to_image_pipeline_is_served_with_its_encoder_decoder_and_carry_over(
    cached_sd_artifact, tmp_path
):
    """An SD-style pipeline (tiny random weights: mechanics) with a cache schedule: two denoiser graphs
    (the cache tensor carried between BLS calls), the prompt encoder and the decoder, each a model."""
    _, artifact = cached_sd_artifact
    with serve_and_compare(artifact, tmp_path, [(0, "a thick seven"), (1, "a thin one")]) as (server, client):
        models = {m["name"] for m in client.get_model_repository_index()}
        assert models == {"denoiser_full", "denoiser_cached", "prompt_encoder", "decoder", "pipeline"}
        bad = [
            ("a thick seven " * 8, "tokens"),  # over the tokenizer's 16
            ("x" * (MAX_PROMPT_CHARS + 1), "at most"),
            (3, "class_label"),  # a class for a text pipeline: not an input of this model
            (None, "prompt"),
        ]
        for condition, message in bad:
            with pytest.raises(Exception, match="(?i)" + message):
                infer(client, 5, condition)
            assert server.alive() and client.is_server_ready()
