"""Issue 35: a policy's artifact served by a real `tritonserver` (nvidia-pytriton's, Python backend): one
decision per request (seed, episode, decision index, observation history) returns the action chunk, equal bit
for bit to the in-process runner's, warm-started chunks kept per episode on the server; bad requests get an
error of their own and the server stays up. Random weights: mechanics."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import lower, run_recipe
from lerobot_layout import save

from backends.registry import open_runner
from calibration.capture import capture_calibration
from core.environments import programs, pusht
from core.loading import load_program
from optimizer.cli import main
from serving.load import infer_action
from serving.local_server import PROJECT, TritonServer
from serving.triton_repo import export_repository

ENV = Path(os.environ.get("TRITON_ENV", PROJECT / ".venv-triton"))
pytestmark = pytest.mark.skipif(
    not (ENV / "bin" / "python").exists(), reason=f"no Triton server environment at {ENV}: optimize serving-env {ENV}"
)
http = pytest.importorskip("tritonclient.http")


def observations(rng, n=1):
    state = rng.uniform(50, 450, (n, 2, 2)).astype(np.float32)
    return {pusht.STATE: state, pusht.ENV_STATE: rng.uniform(50, 450, (n, 2, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-policy")
    program = load_program(save(root / "policy"))
    rng = np.random.default_rng(0)
    observed = {k: torch.from_numpy(v) for k, v in observations(rng, 8).items()}
    program = program.replace(stages=dataclasses.replace(program.stages, observations=observed))
    recipe = [
        {"pass": "sampler", "config": {"scheduler": "ddpm", "sampling_steps": 16}},
        {"pass": "warm_start", "config": {"timestep": 30}},
    ]
    warm = run_recipe(program, capture_calibration(program, 2), recipe)
    lower(warm, root / "artifact")
    export_repository(root / "artifact", root / "repo", graphs="python", max_batch=4)
    with TritonServer(ENV, root / "repo", root) as server:
        yield server, root / "artifact"
    assert not server.alive()


def test_served_chunks_equal_the_runners_at_first_and_warm_decisions(served):
    server, artifact = served
    runner = open_runner(artifact)
    assert runner.plan.sampling.warm_start == 30.0
    in_process = programs.as_policy(runner.sample, runner.decode, 7, runner.plan.sampling, runner.plan.chunking)
    client = http.InferenceServerClient(server.url)
    rng = np.random.default_rng(1)
    for decision in range(3):
        for episode in (3, 4):
            obs = observations(rng)
            seed = 7 + decision * programs.STRIDE + episode
            got = infer_action(client, seed, episode, decision, {k: v[0] for k, v in obs.items()})
            want = in_process(decision, np.array([episode]), obs)
            assert got.shape == (1, 8, 2)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"nan": True}, "NaN"),
        ({"episode": 999, "decision": 2}, "send its decision 0 first"),
        ({"shape": (3, 2)}, "shape"),
        ({"seed": -1}, "seed"),
    ],
    ids=["nan-observation", "warm-decision-of-an-unknown-episode", "wrong-observation-shape", "negative-seed"],
)
def test_a_bad_request_gets_its_own_error_and_the_server_stays_up(served, change, message):
    server, _ = served
    client = http.InferenceServerClient(server.url)
    obs = {k: v[0] for k, v in observations(np.random.default_rng(2)).items()}
    if change.get("nan"):
        obs[pusht.STATE][0, 0] = np.nan
    if "shape" in change:
        obs[pusht.STATE] = np.zeros(change["shape"], np.float32)
    with pytest.raises(Exception, match="(?i)" + message):
        infer_action(client, change.get("seed", 5), change.get("episode", 1), change.get("decision", 0), obs)
    assert server.alive() and client.is_server_ready()
    good = {k: v[0] for k, v in observations(np.random.default_rng(3)).items()}
    assert infer_action(client, 5, 1, 0, good).shape == (1, 8, 2)


def test_bench_serving_drives_an_episode_through_the_server_at_batch_1(served, tmp_path):
    server, artifact = served
    out = tmp_path / "bench.json"
    args = ["bench-serving", str(artifact), "--url", server.url, "--episodes", "1", "--json-out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    assert bench["decisions"] == 75 and bench["served_vs_runner_max_action_difference"] == 0.0  # 300 steps / 4
    assert 0 < bench["p50_ms"] <= bench["p99_ms"]
