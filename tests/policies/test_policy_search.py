"""`cpu-auto` on a policy: the target's policy space (loop knobs of policies: sampler, warm starts) replaces
the image space, trials are judged closed loop on episodes of their own, and their speed is the time per
decision over an episode (a warm-started loop's later decisions weighed in). A tiny random policy: mechanics
only; the searches on the trained references are benchmark runs (BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from lerobot_layout import save

from core.errors import EXIT_PASS, ConfigError
from core.loading import load_program
from optimizer.cli import main
from optimizer.targets import TARGETS_DIR, get_target, parse_target
from verify.judges.closed_loop import PROXY_EPISODE_SEED

COLD_MS, WARM_MS = 10.0, 2.0


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return save(tmp_path_factory.mktemp("policy") / "pusht")


def small_target(folder) -> str:
    data = json.loads((TARGETS_DIR / "cpu-auto.json").read_text())
    space = data["policy_search"]
    space.update(trials=3, startup_trials=1, finalists=1, proxy_samples=2, latency_repeats=1)
    space["knobs"] = {
        "steps": {k: space["knobs"]["steps"][k] for k in ("DDPM 16", "DDIM 10")},
        "warm start": {k: space["knobs"]["warm start"][k] for k in ("none", "from timestep 30")},
    }
    space["first"] = [{"steps": "DDPM 16", "warm start": "from timestep 30"}]
    path = folder / "auto.json"
    path.write_text(json.dumps({**data, "name": "tiny-auto"}))
    return str(path)


def test_cpu_auto_gives_a_policy_its_own_space_and_an_image_model_the_image_space(policy_folder, tiny_digits_program):
    target = get_target("cpu-auto")
    policy = load_program(policy_folder)
    assert target.space_for(policy)[0] is target.policy_search and target.policy_search.size == 36
    assert target.space_for(tiny_digits_program)[0] is target.search
    data = json.loads((TARGETS_DIR / "cpu-auto.json").read_text())
    with pytest.raises(ConfigError, match="'policy_search' is a policy's space beside 'search'"):
        parse_target({k: v for k, v in data.items() if k != "search"}, "t")


def test_a_policys_trials_run_closed_loop_and_are_timed_per_decision_over_an_episode(
    policy_folder, tmp_path, monkeypatch
):
    import search.trials

    def fixed(loops, **_):  # a cold loop costs COLD_MS, a warm decision WARM_MS
        return {k: WARM_MS if k.endswith(" warm") else COLD_MS for k in loops}

    monkeypatch.setattr(search.trials, "paired_median_ms", fixed)
    out = tmp_path / "out"
    args = [str(policy_folder), "--target", small_target(tmp_path), "--out", str(out), "--episodes", "2"]
    args += ["--samples", "8", "--calibration-samples", "4", "--latency-repeats", "0", "--seed-sets", "1"]
    args += ["--gate", "max_fd_self_shift=1e9"]  # random weights: the mechanics, not the distribution
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_PASS, result.output
    record = json.loads((out / "report.json").read_text())["search"]
    assert list(record["space"]["knobs"]) == ["steps", "warm start"]
    decisions = 300 // 4  # PushT's step limit, 4 actions per chunk
    for row in record["trials"]:
        metrics = row["metrics"]
        assert metrics["episode_seeds"] == f"{PROXY_EPISODE_SEED}..{PROXY_EPISODE_SEED + 1}"  # its own episodes
        assert metrics["success_shortfall"] == 0.0 and "max_success_shortfall" in metrics["constraints"]
        warm = row["params"]["warm start"] != "none"
        expected = (COLD_MS + (decisions - 1) * WARM_MS) / decisions if warm else COLD_MS
        assert metrics["loop_ms"] == pytest.approx(expected) and metrics["original_loop_ms"] == COLD_MS
