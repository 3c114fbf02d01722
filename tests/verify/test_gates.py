"""Gates: a gate applies when a judge of the model computes its metric (decided before any work), an
applicable gate without a value was not measured and fails, and a run that measured nothing fails."""

import math

import pytest

from core.errors import ConfigError
from verify.gates import (
    FAIL,
    NOT_APPLICABLE,
    NOT_MEASURED,
    PASS,
    GatePlan,
    evaluate_gates,
    gates_table,
    passed,
    plan_gates,
    verdict_line,
)
from verify.judges import JudgeOptions, JudgePlan


def judged(*metrics: str) -> JudgePlan:
    return JudgePlan((), frozenset(metrics), {"digits": "applies to 1x16x16 digit images"}, JudgeOptions())


def test_pass_fail_not_measured_and_not_applicable():
    plan = GatePlan(
        {"min_psnr_db": 60, "max_eps_rel_error": 1e-3, "max_fd_self_shift": 0.03, "max_class_agreement_drop": 0.0},
        {"max_class_agreement_drop": "digits judge: applies to 1x16x16 digit images"},
    )
    summary = {"psnr_db_mean": 59.0, "eps_rel_error_max": 1e-4, "fd_self_candidate": 2.0, "fd_self_floor": 1.9}
    results = evaluate_gates(plan, summary)
    assert [r.status for r in results] == [FAIL, PASS, NOT_MEASURED, NOT_APPLICABLE]
    assert [r.passed for r in results] == [False, True, False, None]
    assert not passed(results)
    assert verdict_line(results) == "FAIL: failed: min_psnr_db; not measured: max_fd_self_shift"
    table = gates_table(results)
    assert "not measured" in table and "not applicable" in table and "digits judge" in table


def test_a_distribution_gate_shows_the_shift_terms_the_candidate_and_the_floor():
    plan = GatePlan({"max_fd_self_shift": 0.03}, {})
    terms = {"fd_self_shift_mean": 0.02, "fd_self_shift_cov": 0.005, "fd_self_candidate": 0.022, "fd_self_floor": 0.02}
    results = evaluate_gates(plan, {"fd_self_shift": 0.025, **terms})
    assert results[0].status == PASS and results[0].value == 0.025
    assert results[0].reason == "1 seed set: seed noise not measured; mean 0.02 + cov 0.005; FD 0.022 vs floor 0.02"
    sets = {"fd_self_shift_sets": [0.02, 0.03], "fd_self_shift_ci": 0.0635, "seed_sets_within_noise": ["fd_self"]}
    (pooled,) = evaluate_gates(plan, {"fd_self_shift": 0.025, **terms, **sets})
    assert pooled.reason.startswith("mean of 2 seed sets (0.02, 0.03), 95% interval +- 0.0635, which holds the bound")
    assert passed(results) and verdict_line(results) == "PASS"
    over = evaluate_gates(plan, {"fd_self_shift": 0.031, **terms})
    assert over[0].status == FAIL and verdict_line(over) == "FAIL: failed: max_fd_self_shift"


def test_a_run_that_measured_nothing_fails_and_a_diverged_value_fails():
    only_skipped = evaluate_gates(GatePlan({"max_class_agreement_drop": 0.02}, {"max_class_agreement_drop": "n/a"}), {})
    assert not passed(only_skipped) and verdict_line(only_skipped) == "FAIL: no gate was measured"
    for value in (math.nan, math.inf):
        diverged = evaluate_gates(GatePlan({"max_fd_self_shift": 0.03}, {}), {"fd_self_shift": value})
        assert diverged[0].status == FAIL and not passed(diverged)


def test_the_planner_refuses_gates_nothing_can_measure_before_any_work():
    bounds = {"max_class_agreement_drop": 0.03, "max_fd_digits_shift": 0.03}
    with pytest.raises(ConfigError, match="none of the gates can be measured on this model: max_class_agreement_drop"):
        plan_gates(bounds, judged("psnr_db_mean", "fd_self_shift"))
    with pytest.raises(ConfigError, match="the target has no gates"):
        plan_gates({}, judged("psnr_db_mean"))
    # A gate the user asked for on the command line must be measurable; a target's may be skipped.
    with pytest.raises(ConfigError, match="gate max_fd_digits_shift cannot be measured on this model"):
        plan_gates({**bounds, "min_psnr_db": 30}, judged("psnr_db_mean"), explicit=["max_fd_digits_shift"])
    plan = plan_gates({**bounds, "min_psnr_db": 30}, judged("psnr_db_mean"))
    assert plan.applicable == {"min_psnr_db": 30} and set(plan.skipped) == set(bounds)
    assert plan.skipped["max_class_agreement_drop"] == "digits judge: applies to 1x16x16 digit images"


def test_every_gate_names_a_metric_some_judge_computes():
    from verify.gates import GATES
    from verify.judges import source_of

    assert {g: source_of(g.metric) is not None for g in GATES.values()} == dict.fromkeys(GATES.values(), True)
