"""The step-reduction passes on the shipped DiT: the training-free schedule search, guidance and
progressive distillation (tiny budgets: mechanics and contracts; fidelity is measured in BENCHMARKS.md)."""

import dataclasses

import pytest
import torch

from calibration.capture import capture_calibration
from core.errors import ConfigError
from passes.analyses import CALIBRATION
from passes.manager import offline_context, plan_passes, run_passes

FP32 = frozenset({"fp32"})


@pytest.fixture(scope="module")
def dit_calibration(dit_program):
    return capture_calibration(dit_program, 4)


def context(program, calibration):
    ctx = offline_context(program, calibration)
    ctx.analyses._capture = lambda reference: capture_calibration(reference, 4)
    return ctx


def test_schedule_search_beats_the_uniform_grid_on_the_calibration_seeds(dit_program, dit_calibration):
    recipe = [{"pass": "schedule", "config": {"sampling_steps": 2, "solvers": ["ddim", "euler"], "sweeps": 1}}]
    result = run_passes(
        dit_program, plan_passes(recipe, FP32, program=dit_program), context(dit_program, dit_calibration)
    )
    decision = result.decision("schedule")
    assert [row["solver"] for row in decision.tried] == ["ddim", "euler"]
    for row in decision.tried:
        assert row["searched_psnr_db"] >= row["uniform_psnr_db"]
    # DDIM's own 2-step grid starts at t=500, half-way down: any searched grid does better.
    assert max(row["searched_psnr_db"] - row["uniform_psnr_db"] for row in decision.tried) > 1.0
    plan = result.plan
    assert plan.num_inference_steps == 2 and plan.timesteps == tuple(decision.timesteps)
    assert plan.guidance_scale == dit_program.plan.guidance_scale  # same guidance: 2 x 2 evaluations


def test_schedule_refuses_unknown_solvers_and_too_many_steps(dit_program):
    with pytest.raises(ConfigError, match="unknown solver"):
        plan_passes([{"pass": "schedule", "config": {"solvers": ["heun3"]}}], FP32, program=dit_program)
    with pytest.raises(ConfigError, match="steps"):
        plan_passes([{"pass": "schedule", "config": {"sampling_steps": 5000}}], FP32)


def test_guidance_then_progressive_distillation_leave_a_one_evaluation_ddim_student(dit_program, dit_calibration):
    recipe = [
        {"pass": "sampler", "config": {}},
        {"pass": "guidance_distill", "config": {"steps": 2, "batch": 4, "samples": 4}},
        {"pass": "progressive_distill", "config": {"sampling_steps": 4, "round_steps": 2, "batch": 4, "samples": 4}},
    ]
    planned = plan_passes(recipe[::-1], FP32, program=dit_program)
    # One phase: recipe order within it (Meng et al. fold guidance first); the loop's own phase before.
    assert [q.name for q in planned] == ["sampler", "progressive_distill", "guidance_distill"]
    planned = plan_passes(recipe, FP32, program=dit_program)
    ctx = context(dit_program, dit_calibration)
    result = run_passes(dit_program, planned, ctx)
    plan = result.plan
    assert plan.guidance_scale == 1.0 and plan.num_inference_steps == 4
    assert plan.scheduler_class == "GridDDIMScheduler" and plan.scheduler_config["clip_sample"] is False
    rounds = result.decision("progressive_distill").rounds
    assert [(r["teacher_steps"], r["student_steps"]) for r in rounds] == [(20, 10), (10, 5), (5, 4)]
    assert all(r["steps"] == 2 for r in rounds)
    assert plan.timesteps == tuple(result.decision("progressive_distill").timesteps)
    assert result.decision("guidance_distill").scale == dit_program.plan.guidance_scale
    pairs = zip(result.denoiser.parameters(), dit_program.denoiser.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    assert ctx.analyses.computed[CALIBRATION] == 0  # nothing read calibration for the new loops


def test_distillation_needs_guidance_and_fewer_steps(unet_program):
    unguided = unet_program.replace(plan=dataclasses.replace(unet_program.plan, guidance_scale=1.0))
    with pytest.raises(ConfigError, match="nothing to fold in"):
        plan_passes([{"pass": "guidance_distill"}], FP32, program=unguided)
    with pytest.raises(ConfigError, match="not fewer"):
        plan_passes([{"pass": "progressive_distill", "config": {"sampling_steps": 20}}], FP32, program=unet_program)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_matching_models_distil_and_search_on_euler_grids(flow_folders, name):
    """Tiny random SD3 / Flux (mechanics only): the student runs flow-matching Euler on its grid."""
    from core.loading import load_program
    from core.variants import sample_program

    program = load_program(flow_folders[name])
    program = program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=4))
    calibration = capture_calibration(program, 2)
    tiny = {"batch": 2, "samples": 2}
    recipe = [
        {"pass": "progressive_distill", "config": {"sampling_steps": 2, "round_steps": 1, **tiny}},
        {"pass": "schedule", "config": {"sampling_steps": 3, "sweeps": 0}},
    ]
    if name == "sd3":  # Flux runs no classifier-free guidance (embedded guidance instead)
        recipe.insert(0, {"pass": "guidance_distill", "config": {"steps": 1, **tiny}})
    result = run_passes(program, plan_passes(recipe, FP32, program=program), context(program, calibration))
    plan = result.plan
    assert plan.scheduler_class == "FlowMatchEulerDiscreteScheduler" and plan.num_inference_steps == 2
    assert plan.guidance_scale == 1.0 and result.decision("schedule").solver == "euler"
    assert sample_program(result, [0], ["a thick seven"]).isfinite().all()


class ScriptedCheck:
    """A stand-in for verify.floor_check.FloorCheck: shifts per round, in order."""

    floor = 0.5
    shifts: tuple = ()

    def __init__(self, original, *_, **__):
        self.calls = iter(self.shifts)

    def shift(self, candidate):
        return next(self.calls)


@pytest.mark.parametrize(("shifts", "kept_steps"), [([1.0, 1.1, 1.4], 5), ([1.2, 1.1, 1.0], 4), ([1.3], None)])
def test_progressive_rounds_stop_at_the_first_student_over_the_distribution_bound(
    dit_program, dit_calibration, monkeypatch, shifts, kept_steps
):
    monkeypatch.setattr("passes.analyses.FloorCheck", ScriptedCheck)
    monkeypatch.setattr(ScriptedCheck, "shifts", shifts)
    config = {"sampling_steps": 4, "round_steps": 1, "batch": 4, "samples": 4, "max_fd_shift": 1.25}
    planned = plan_passes([{"pass": "progressive_distill", "config": config}], FP32, program=dit_program)
    if kept_steps is None:
        with pytest.raises(ConfigError, match=r"no student kept the distribution \(shift 1.3 after 20 -> 10 steps"):
            run_passes(dit_program, planned, context(dit_program, dit_calibration))
        return
    result = run_passes(dit_program, planned, context(dit_program, dit_calibration))
    rounds = result.decision("progressive_distill").rounds
    assert [r["fd_shift"] for r in rounds] == shifts[: len(rounds)]
    assert [r["kept"] for r in rounds] == [r <= 1.25 for r in shifts[: len(rounds)]]
    assert result.plan.num_inference_steps == kept_steps
    assert result.plan.timesteps == tuple(result.decision("progressive_distill").timesteps)


@pytest.mark.parametrize(("shifts", "trained", "checks"), [((1.3, 1.2, 1.1), 6, 3), ((1.0,), 2, 1), ((1.5,) * 9, 8, 4)])
def test_guidance_distillation_trains_on_while_the_student_is_over_the_distribution_bound(
    dit_program, dit_calibration, monkeypatch, shifts, trained, checks
):
    monkeypatch.setattr("passes.analyses.FloorCheck", ScriptedCheck)
    monkeypatch.setattr(ScriptedCheck, "shifts", shifts)
    config = {"steps": 2, "max_steps": 8, "batch": 4, "samples": 4, "max_fd_shift": 1.15}
    planned = plan_passes([{"pass": "guidance_distill", "config": config}], FP32, program=dit_program)
    result = run_passes(dit_program, planned, context(dit_program, dit_calibration))
    decision = result.decision("guidance_distill")
    # Checked after every chunk of `steps`; stops at the first shift within the bound or at max_steps.
    assert [c["steps"] for c in decision.checks] == [2 * (i + 1) for i in range(checks)]
    assert [c["fd_shift"] for c in decision.checks] == list(shifts[:checks])
    assert decision.steps == trained and result.plan.guidance_scale == 1.0
    held = "not reached within max_steps" not in "\n".join(decision.markdown())
    assert held == (shifts[checks - 1] <= 1.15)


def test_a_progressive_round_trains_on_while_its_student_is_over_the_bound(dit_program, dit_calibration, monkeypatch):
    monkeypatch.setattr("passes.analyses.FloorCheck", ScriptedCheck)
    monkeypatch.setattr(ScriptedCheck, "shifts", (1.4, 1.3, 1.2, 1.0, 1.5, 1.6, 1.7))
    config = {
        "sampling_steps": 4,
        "round_steps": 1,
        "max_round_steps": 3,
        "batch": 4,
        "samples": 4,
        "max_fd_shift": 1.25,
    }
    planned = plan_passes([{"pass": "progressive_distill", "config": config}], FP32, program=dit_program)
    result = run_passes(dit_program, planned, context(dit_program, dit_calibration))
    rounds = result.decision("progressive_distill").rounds
    # 20 -> 10 kept on its third chunk, 10 -> 5 on its first, 5 -> 4 over the bound after all three.
    assert [[c["fd_shift"] for c in r["checks"]] for r in rounds] == [[1.4, 1.3, 1.2], [1.0], [1.5, 1.6, 1.7]]
    assert [r["steps"] for r in rounds] == [3, 1, 3] and [r["kept"] for r in rounds] == [True, True, False]
    assert result.plan.num_inference_steps == 5


@pytest.mark.parametrize("name", ["cache", "guidance_distill", "progressive_distill"])
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"max_fd_shift": -1.0}, "max_fd_shift must be in [0, 100] (0: no distribution check)"),
        ({"check_samples": 3}, "check_samples must be in [4, "),
    ],
)
def test_the_distribution_check_options_are_checked_before_any_work(name, option, message):
    with pytest.raises(ConfigError) as refused:
        plan_passes([{"pass": name, "config": option}], FP32)
    assert str(refused.value).startswith(f"{name}: {message}")
