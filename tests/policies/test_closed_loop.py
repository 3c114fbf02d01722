"""Policies are judged closed loop: the success-rate gate reads the candidate's episodes against the original's
interval on the same episodes, an `optimize` run measures it end to end, and a policy without an environment
(or an environment for a model that is no policy) is one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from lerobot_layout import save

from backends.plan import read_plan
from core.environments.rollout import Episodes
from core.errors import EXIT_BAD_INPUT, EXIT_PASS
from optimizer.cli import main
from verify.gates import GATES
from verify.judges.closed_loop import compare


def episodes(successes: int, n: int = 40) -> Episodes:
    success = np.arange(n) < successes
    return Episodes(list(range(n)), success, np.where(success, 0.97, 0.5), np.full(n, 100), 13)


def test_a_candidate_below_the_originals_interval_falls_short_and_one_inside_does_not():
    original = episodes(30)
    low, _ = original.interval()
    short = compare(original, episodes(20))
    assert short["success_shortfall"] == pytest.approx(low - 0.5) and short["success_shortfall"] > 0
    assert compare(original, episodes(26))["success_shortfall"] == 0.0  # 0.65: inside the interval
    assert compare(original, episodes(40))["success_shortfall"] == 0.0
    assert short["coverage_drop"] == pytest.approx((30 - 20) * 0.47 / 40)
    assert GATES["max_success_shortfall"].metric == "success_shortfall"


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return save(tmp_path_factory.mktemp("policy") / "pusht")


def test_optimize_measures_a_policys_success_closed_loop(policy_folder, tmp_path):
    out = tmp_path / "out"
    args = ["--target", "cpu-fp32", "--out", str(out), "--episodes", "2", "--samples", "8"]
    args += ["--calibration-samples", "4", "--latency-repeats", "0", "--seed-sets", "1"]
    result = CliRunner().invoke(main, [str(policy_folder), *args])
    assert result.exit_code == EXIT_PASS, result.output
    report = json.loads((out / "report.json").read_text())
    verification = report["verification"]
    assert "closed-loop" in verification["judges"]
    assert verification["episodes"] == 2 and verification["policy_calls"] == 75  # 300 steps, 4 actions per chunk
    assert verification["success_rate"] == verification["success_rate_reference"]  # ORT = torch, same noise
    assert report["gates"]["max_success_shortfall"] == 0.0 and "max_success_shortfall" in result.output
    assert verification["success_shortfall"] == 0.0
    # Paired action error in the environment's units: ORT = torch here, while two noise seeds of the original
    # (its own spread on the same observations) differ by whole pixels.
    assert verification["action_rmse_mean"] < 1e-2 < 1.0 < verification["action_rmse_floor"]
    assert report["model"]["stages"]["output"].startswith("actions") and (out / "grid.png").stat().st_size > 0
    plan = read_plan(out)
    assert (plan.chunking.n_obs_steps, plan.chunking.n_action_steps, plan.environment) == (2, 4, "pusht")
    timed = CliRunner().invoke(
        main, ["policy-latency", str(out), "--repeats", "1", "--json-out", str(tmp_path / "t.json")]
    )
    assert timed.exit_code == EXIT_PASS, timed.output
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["network_evaluations"] for r in rows.values()] == [4, 10, 4]  # its plan, DDIM 10, the artifact's
    assert all(r["ms_per_decision"] > 0 for r in rows.values())


def test_a_policy_needs_an_environment_and_only_a_policy_takes_one(tmp_path, tiny_digits_dit):
    no_env = save(tmp_path / "no-env", env=None)
    result = CliRunner().invoke(main, [str(no_env), "--out", str(tmp_path / "o")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "a policy is judged in its environment: pass --env (known: pusht)" in result.output
    result = CliRunner().invoke(main, [str(tiny_digits_dit), "--env", "pusht", "--out", str(tmp_path / "o2")])
    assert result.exit_code == EXIT_BAD_INPUT and "is not a policy (it takes no observations)" in result.output


def test_cpu_policy_warm_starts_the_artifacts_chunks_as_the_torch_loop_does(policy_folder, tmp_path):
    from backends.registry import open_runner
    from core.environments import programs, pusht
    from core.loading import load_program

    out = tmp_path / "out"
    args = ["--target", "cpu-policy", "--out", str(out), "--episodes", "2", "--samples", "8"]
    args += ["--calibration-samples", "4", "--latency-repeats", "0", "--seed-sets", "1"]
    args += ["--gate", "max_fd_self_shift=100"]  # random weights: the mechanics, not the distribution
    result = CliRunner().invoke(main, [str(policy_folder), *args])
    assert result.exit_code == EXIT_PASS, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["policy_calls"] == 75 and "success_shortfall" in report["verification"]
    runner = open_runner(out)
    assert runner.plan.sampling.warm_start == 30.0 and runner.plan.sampling.scheduler_class == "DDPMScheduler"
    # The artifact's policy and the torch loop on its plan: the same actions at a first and at warm decisions.
    program = load_program(policy_folder)
    chunking = program.spec.chunking
    artifact = programs.as_policy(runner.sample, runner.decode, 9, runner.plan.sampling, chunking)
    in_torch = programs.torch_policy(program.replace(plan=runner.plan.sampling), 9)
    rng = np.random.default_rng(0)
    for decision in range(3):
        obs = {pusht.STATE: rng.uniform(50, 450, (2, 2, 2)), pusht.ENV_STATE: rng.uniform(50, 450, (2, 2, 16))}
        obs = {k: v.astype(np.float32) for k, v in obs.items()}
        got, want = artifact(decision, np.array([0, 1]), obs), in_torch(decision, np.array([0, 1]), obs)
        assert np.allclose(got, want, atol=1e-2), (decision, np.abs(got - want).max())
    args = ["policy-latency", str(out), "--repeats", "1", "--threads", "1", "--json-out", str(tmp_path / "t.json")]
    timed = CliRunner().invoke(main, args)
    assert timed.exit_code == EXIT_PASS, timed.output
    timings = json.loads((tmp_path / "t.json").read_text())
    rows = timings["rows"]
    assert timings["artifact_threads"] == 1
    # its plan, DDIM 10, the artifact's first decision, a warm one, and an episode's mean (75 decisions)
    evaluations = [r["network_evaluations"] for r in rows.values()]
    assert evaluations == [4, 10, 16, 6, pytest.approx((16 + 74 * 6) / 75)]
    assert "warm-started" in timed.output


def test_action_errors_are_measured_for_policies_only(tiny_digits_program):
    from verify.judges.base import JudgeOptions
    from verify.judges.paired import ACTION_METRICS, JUDGE

    assert not JUDGE.provides(tiny_digits_program, JudgeOptions()) & ACTION_METRICS
