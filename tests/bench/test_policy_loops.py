"""`optimize policy-loops`: a policy's success under loops named as specs, closed loop in torch on the judge's
episodes, after an optional recipe (a consistency student's own step counts). Random weights: mechanics."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner
from helpers import run_recipe, with_pusht_observations

from bench.policy_loops import judge_loops, loop_plan
from core.errors import EXIT_BAD_INPUT, ConfigError
from core.loading import load_program
from optimizer.cli import main


def test_loop_specs_name_samplers_steps_overrides_and_warm_starts(transformer_checkpoint):
    program = load_program(transformer_checkpoint)
    plan = loop_plan(program, "ddpm,timestep_spacing=trailing:16:30")
    assert plan.scheduler_class == "DDPMScheduler" and plan.num_inference_steps == 16 and plan.warm_start == 30.0
    assert plan.scheduler_config["timestep_spacing"] == "trailing"
    assert loop_plan(program, "DDIMScheduler:10").scheduler_class == "DDIMScheduler"
    assert loop_plan(program, "plan") == program.plan
    warm = program.replace(plan=dataclasses.replace(program.plan, warm_start=50.0))
    assert loop_plan(warm, "plan").warm_start == 50.0 and loop_plan(warm, "ddim:10").warm_start is None
    for spec, message in [
        ("ddim", "expected SCHEDULER"),
        ("ddim:x", "STEPS must be an integer"),
        ("ddim,oops:10", "not key=value"),
        ("consistency:2", "not a consistency student"),
        ("nosuch:4", "unknown scheduler"),
        ("ddpm:10:95", "must lie within the loop's timesteps"),
    ]:
        with pytest.raises(ConfigError, match=message):
            loop_plan(program, spec)


def test_each_loop_of_a_consistency_student_is_judged_on_the_judges_episodes(transformer_checkpoint):
    config = {"sampling_steps": 2, "teacher_steps": 20, "steps": 2, "batch": 4, "samples": 4}
    program = with_pusht_observations(load_program(transformer_checkpoint))
    student = run_recipe(program, None, [{"pass": "consistency_distill", "config": config}])
    rows = judge_loops(student, "pusht", ["consistency:1", "consistency:4:50"], episodes=2)
    assert [r["loop"] for r in rows] == ["consistency:1", "consistency:4:50"]
    assert rows[0]["timesteps"] == [99.0] and rows[1]["timesteps"] == [99.0, 74.0, 49.0, 24.0]
    assert [r["evaluations_first_decision"] for r in rows] == [1, 4]
    assert all(0.0 <= r["success_rate"] <= 1.0 and r["interval"][0] <= r["interval"][1] for r in rows)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (None, "STEPS must be an integer"),
        ("[1, 2]", "must be a JSON list of pass steps"),
        ('[{"pass": "consistency_distill", "config": {"teacher_steps": 30}}]', "must divide the 100 train timesteps"),
    ],
)
def test_a_bad_loop_or_recipe_is_one_line_before_anything_runs(transformer_checkpoint, tmp_path, recipe, message):
    args = ["policy-loops", str(transformer_checkpoint), "--loop", "ddim:x" if recipe is None else "consistency:2"]
    if recipe is not None:
        (tmp_path / "recipe.json").write_text(recipe)
        args += ["--recipe", str(tmp_path / "recipe.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_BAD_INPUT and message in result.output
    assert len(result.output.strip().splitlines()) == 1
