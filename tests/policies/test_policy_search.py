"""`cpu-auto` on a policy: the target's policy space (loop knobs of policies: sampler, warm starts) replaces
the image space, trials are judged closed loop on episodes of their own, and their speed is the time per
decision over an episode (a warm-started loop's later decisions weighed in). A tiny random policy: mechanics
only; the searches on the trained references are benchmark runs (BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest
from lerobot_layout import save

from core.errors import ConfigError
from core.loading import load_program
from optimizer.targets import TARGETS_DIR, get_target, parse_target
from verify.judges.closed_loop import PROXY_EPISODE_SEED

COLD_MS, WARM_MS = 10.0, 2.0


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return save(tmp_path_factory.mktemp("policy") / "pusht")


def test_cpu_auto_gives_a_policy_its_own_space_and_an_image_model_the_image_space(policy_folder, tiny_digits_program):
    target = get_target("cpu-auto")
    policy = load_program(policy_folder)
    assert target.space_for(policy)[0] is target.policy_search and target.policy_search.size == 36
    assert target.space_for(tiny_digits_program)[0] is target.search
    data = json.loads((TARGETS_DIR / "cpu-auto.json").read_text())
    with pytest.raises(ConfigError, match="'policy_search' is a policy's space beside 'search'"):
        parse_target({k: v for k, v in data.items() if k != "search"}, "t")


def test_a_policys_trials_run_closed_loop_and_are_timed_per_decision_over_an_episode(policy_folder, monkeypatch):
    from helpers import with_pusht_observations

    import search.trials
    from backends.registry import get_backend
    from calibration.capture import capture_calibration
    from passes.manager import offline_context
    from search.space import parse_space
    from search.trials import TrialRunner
    from verify.judges import JudgeOptions, plan_judges

    def fixed(loops, **_):  # a cold loop costs COLD_MS, a warm decision WARM_MS
        return {k: WARM_MS if k.endswith(" warm") else COLD_MS for k in loops}

    monkeypatch.setattr(search.trials, "paired_median_ms", fixed)
    program = with_pusht_observations(load_program(policy_folder))
    data = json.loads((TARGETS_DIR / "cpu-auto.json").read_text())["policy_search"]
    data.update(proxy_samples=2, latency_repeats=1, first=[])
    space = parse_space(data, "test")
    ctx = offline_context(program, capture_calibration(program, 2), frozenset({"fp32"}))
    gates = {"max_success_shortfall": 0.0, "max_fd_self_shift": 1e9}
    judges = plan_judges(program, JudgeOptions(episodes=2))
    runner = TrialRunner(program, ctx, space, gates, get_backend({"name": "onnxruntime"}), print, judges)
    decisions = 300 // 4  # PushT's step limit, 4 actions per chunk
    try:
        for warm, expected in (
            ("from timestep 30", (COLD_MS + (decisions - 1) * WARM_MS) / decisions),
            ("none", COLD_MS),
        ):
            params = {"structure": "none", "steps": "DDPM 16", "warm start": warm, "numbers": "fp32"}
            metrics = runner.evaluate(params)
            assert metrics["episode_seeds"] == f"{PROXY_EPISODE_SEED}..{PROXY_EPISODE_SEED + 1}"  # its own episodes
            assert metrics["success_shortfall"] == 0.0 and "max_success_shortfall" in metrics["constraints"]
            assert metrics["loop_ms"] == pytest.approx(expected) and metrics["original_loop_ms"] == COLD_MS
    finally:
        runner.close()
