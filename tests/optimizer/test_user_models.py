"""Models no shipped judge knows everything about (a tiny random RGB SD-style pipeline, a 3x32x32 DiT;
random weights, mechanics only) on every shipped target: the digits gates do not apply and say why, the
gates every model has are measured, and the exit code and verdict are what the report's own numbers say:
PASS only when a measured gate held and none failed or went unmeasured. Training budgets are cut to a
few steps (the shipped recipes otherwise), so what is checked is the verdict's honesty, not quality."""

import json

import pytest
from click.testing import CliRunner
from helpers import assert_exit_matches_report, shortened

from core.errors import EXIT_BAD_INPUT
from optimizer.cli import main
from optimizer.targets import list_targets

UNIVERSAL = ("min_psnr_db", "min_ssim", "max_eps_rel_error", "max_fd_self_shift")
AVAILABLE = [t.name for t in list_targets() if t.status == "available"]
DISTILLED = {t.name for t in list_targets() if t.search or any(s["pass"] == "progressive_distill" for s in t.recipe)}
SEARCHED = {t.name for t in list_targets() if t.search}
POLICY_ONLY = {t.name for t in list_targets() if any(s["pass"] == "warm_start" for s in t.recipe)}


# The DiT on every target; the pipeline (its stages lowered and judged on decoded RGB images) on a target
# that keeps the loop and one that distills it.
RUNS = [*((t, "dit") for t in AVAILABLE if t not in POLICY_ONLY), ("cpu-fp32", "sd"), ("cpu-steps", "sd")]
# A search target's one trial: INT8 on the original loop (a Q/DQ graph lowered and timed inside the search, its
# prefix the trial itself); the distilled recipes' mechanics are cpu-steps' here and the search's in
# tests/optimizer/test_search_cli.py. Each of its shipped first recipes lowered five graphs (41 s of 123 s here).
FIRST = {"structure": "none", "steps": "20 x CFG", "numbers": "int8", "loop": "none"}


@pytest.mark.parametrize("target,which", RUNS, ids=[f"{t}-{w}" for t, w in RUNS])
def test_every_target_on_a_model_no_judge_knows_passes_only_on_measured_gates(target, which, user_models, tmp_path):
    model = user_models[which]
    out = tmp_path / "out"
    steps = "8" if target in DISTILLED else "4"  # progressive distillation needs steps to halve toward 4
    args = ["--samples", "4", "--calibration-samples", "2", "--latency-repeats", "0", "--steps", steps]
    target_file = shortened(target, tmp_path, FIRST if target in SEARCHED else None)
    result = CliRunner().invoke(main, [str(model), "--target", target_file, "--out", str(out), *args])
    report = assert_exit_matches_report(result, out)
    skipped = report["gates_not_applicable"]
    assert {g for g in report["gates"] if "digits" in g or "agreement" in g or "success" in g} == set(skipped)
    policies = "closed-loop judge: applies to policies (action chunks conditioned on observations)"
    assert all(
        why.startswith("digits judge: applies to the zoo's 1x16x16") or why == policies for why in skipped.values()
    )
    measured = [g for g in report["gates"] if g in UNIVERSAL]
    assert measured and all(report["verification"].get(GATE_METRICS[g]) is not None for g in measured)
    assert report["verification"]["judges"] == ["paired", "denoiser-features"]


def test_a_policy_only_target_refuses_an_image_model_in_one_line_before_any_work(user_models, tmp_path):
    assert {"cpu-policy"} == POLICY_ONLY
    out = tmp_path / "o"
    result = CliRunner().invoke(main, [str(user_models["dit"]), "--target", "cpu-policy", "--out", str(out)])
    assert result.exit_code == EXIT_BAD_INPUT and not out.exists()
    assert result.stderr.strip() == (
        "error: warm_start: applies to policies (action chunks executed in part, then re-planned)"
    )


GATE_METRICS = {"min_psnr_db": "psnr_db_mean", "min_ssim": "ssim_mean", "max_eps_rel_error": "eps_rel_error_max"}
GATE_METRICS["max_fd_self_shift"] = "fd_self_shift"


def test_a_target_whose_gates_cannot_be_measured_is_refused_before_any_work(user_models, tmp_path):
    from optimizer.targets import TARGETS_DIR

    data = json.loads((TARGETS_DIR / "cpu-steps.json").read_text())
    data["gates"] = {"max_class_agreement_drop": 0.03, "max_fd_digits_shift": 0.03}
    target = tmp_path / "digits-only.json"
    target.write_text(json.dumps(data))
    result = CliRunner().invoke(main, [str(user_models["dit"]), "--target", str(target), "--out", str(tmp_path / "o")])
    assert result.exit_code == EXIT_BAD_INPUT
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: none of the gates can be measured on this model: max_class_agreement_drop (digits")
    assert "--gate max_fd_self_shift=0.03" in line and not (tmp_path / "o").exists()
    # A gate asked for on the command line that no judge of the model computes: refused the same way.
    asked = CliRunner().invoke(
        main, [str(user_models["dit"]), "--max-agreement-drop", "0.1", "--out", str(tmp_path / "o")]
    )
    assert asked.exit_code == EXIT_BAD_INPUT
    assert asked.stderr.strip() == (
        "error: gate max_class_agreement_drop cannot be measured on this model (digits judge: applies to the zoo's"
        " 1x16x16 digit images (classes 0-9, or prompts naming a digit))"
    )
    for bad, message in (("max_fd_self_shift", "expected NAME=BOUND"), ("nope=1", "unknown gate(s) ['nope']")):
        r = CliRunner().invoke(main, [str(user_models["dit"]), "--gate", bad, "--out", str(tmp_path / "o")])
        assert r.exit_code == EXIT_BAD_INPUT and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
