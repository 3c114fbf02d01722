"""Consistency distillation (passes/consistency_distill.py) on a tiny transformer policy: the student samples
with diffusers' LCMScheduler on the teacher's grid, composes with warm-started chunks, lowers and is judged
closed loop; its training moves it toward the teacher's ODE; bad configs are refused in one line. Random
weights: mechanics and the direction of training, never fidelity."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from helpers import run_recipe, with_pusht_observations

from core import warm_start
from core.adapters import denoiser_module
from core.distill import FirstOrder, consistency_grid, consistency_plan
from core.errors import EXIT_PASS, ConfigError
from core.loading import load_program
from core.schedulers import build_scheduler
from optimizer.cli import main
from passes import consistency_distill
from passes.manager import plan_passes

FP32 = frozenset({"fp32"})
SHORT = {"steps": 3, "batch": 4, "samples": 8}


@pytest.fixture(scope="module")
def program(transformer_checkpoint):
    return with_pusht_observations(load_program(transformer_checkpoint))


def test_the_student_samples_with_the_lcm_scheduler_on_the_teachers_grid_and_warm_starts(program):
    recipe = [
        {"pass": "consistency_distill", "config": {"sampling_steps": 4, "teacher_steps": 20, **SHORT}},
        {"pass": "warm_start", "config": {"timestep": 50}},
    ]
    result = run_recipe(program, None, recipe)
    plan = result.plan
    assert plan.scheduler_class == "LCMScheduler" and plan.scheduler_config["original_inference_steps"] == 20
    assert [int(t) for t in build_scheduler(dataclasses.replace(plan, warm_start=None)).timesteps] == [99, 74, 49, 24]
    assert warm_start.tail(plan).timesteps == (49.0, 24.0)  # a warm decision: 2 of the 4 consistency steps
    decision = result.decision("consistency_distill")
    assert decision.steps == 3 and decision.timesteps == [99.0, 74.0, 49.0, 24.0]
    pairs = zip(result.denoiser.parameters(), program.denoiser.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_the_ode_grid_leaves_out_its_top_points_without_signal(program):
    """LeRobot's cosine schedule at 100 steps: sqrt(alpha_bar) at timestep 99 is 5e-4, so x0 from epsilon there
    is 2,000x the network's error; the grid and the loop start at 94 (LCM's would at 99). Linear betas keep 99."""
    cosine = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True}
    plan = dataclasses.replace(program.plan, scheduler_config=cosine)
    student = consistency_plan(plan, 20, 2)
    assert consistency_grid(student, 20) == list(range(4, 95, 5))
    assert student.timesteps == (94.0, 49.0) and [int(t) for t in build_scheduler(student).timesteps] == [94, 49]
    assert consistency_plan(program.plan, 20, 2).timesteps == (99.0, 49.0)  # linear betas


def test_training_moves_the_student_toward_the_teachers_ode_end(program):
    """One consistency step of the student lands nearer the teacher's 20-step DDIM sample (the ODE it distils)
    after training than the teacher's own network does under the same one step."""
    config = consistency_distill.Config(sampling_steps=1, teacher_steps=20, steps=150, batch=16, samples=16, lr=1e-3)
    result = run_recipe(program, None, [{"pass": "consistency_distill", "config": dataclasses.asdict(config)}])
    x = torch.randn(16, 8, 2, generator=torch.Generator().manual_seed(1))
    obs = (torch.rand(16, 2, 2) * 2 - 1, torch.rand(16, 2, 16) * 2 - 1)
    ode, grid = FirstOrder(program.plan, "epsilon"), list(range(99, -1, -5))

    def one_step(model) -> torch.Tensor:  # LCM's first step from noise at t = 99: c_skip z + c_out x0
        t = torch.full((16,), 99.0)
        c_skip, c_out = build_scheduler(result.plan).get_scalings_for_boundary_condition_discrete(t)
        x0 = ode.x0(denoiser_module(program.replace(denoiser=model))(x, t, *obs), x, [99.0] * 16)
        return c_skip.view(-1, 1, 1).float() * x + c_out.view(-1, 1, 1).float() * x0

    with torch.no_grad():
        teacher, z = denoiser_module(program), x
        for t, below in zip(grid, [*grid[1:], 0], strict=True):
            z = ode.step(teacher(z, torch.full((16,), float(t)), *obs), z, [float(t)] * 16, [float(below)] * 16)
        before = (one_step(program.denoiser) - z).square().mean()
        after = (one_step(result.denoiser) - z).square().mean()
    assert after < 0.8 * before, (float(before), float(after))


def test_optimize_lowers_and_judges_the_student_closed_loop(transformer_checkpoint, tmp_path):
    target = tmp_path / "cpu-consistency.json"
    recipe = [
        {"pass": "consistency_distill", "config": {"sampling_steps": 2, **SHORT}},
        {"pass": "warm_start", "config": {"timestep": 50}},
    ]
    target.write_text(
        json.dumps(
            {
                "name": "cpu-consistency",
                "status": "available",
                "description": "test",
                "hardware": {"device": "cpu", "capabilities": ["fp32"]},
                "backend": {"name": "onnxruntime", "providers": ["CPUExecutionProvider"]},
                "recipe": recipe,
                "gates": {"max_success_shortfall": 0.5},
            }
        )
    )
    out = tmp_path / "out"
    args = ["--target", str(target), "--out", str(out), "--episodes", "2", "--samples", "8"]
    args += ["--calibration-samples", "4", "--latency-repeats", "0", "--seed-sets", "1"]
    result = CliRunner().invoke(main, [str(transformer_checkpoint), *args])
    assert result.exit_code == EXIT_PASS, result.output
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert plan["sampling"]["scheduler_class"] == "LCMScheduler" and plan["timesteps"] == [99, 49]
    assert report["verification"]["episodes"] == 2 and report["verification"]["success_rate"] is not None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"teacher_steps": 30}, "must divide the 100 train timesteps"),
        ({"sampling_steps": 30, "teacher_steps": 20}, "sampling_steps <= teacher_steps"),
        ({"target_decay": 1.0}, "target_decay"),
    ],
)
def test_a_bad_config_is_refused_before_anything_runs(program, config, message):
    with pytest.raises(ConfigError, match=message):
        plan_passes([{"pass": "consistency_distill", "config": config}], FP32, program=program)


def test_flow_matching_is_refused(program):
    flow = program.replace(plan=dataclasses.replace(program.plan, scheduler_class="FlowMatchEulerDiscreteScheduler"))
    with pytest.raises(ConfigError, match="not flow matching"):
        plan_passes([{"pass": "consistency_distill"}], FP32, program=flow)
