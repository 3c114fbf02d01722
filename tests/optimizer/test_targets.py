"""Item 5: targets are data files; planned targets say so instead of pretending."""

import json

import pytest

from core.errors import ConfigError
from optimizer.targets import get_target, list_targets, require_available
from passes.manager import plan_passes
from verify.gates import GATES

EXPECTED = {
    "cpu-fp32",
    "cpu-int8",
    "cpu-linearize",
    "cpu-cache",
    "cpu-prune",
    "cpu-steps",
    "cpu-auto",
    "cpu-policy",
    "a100-int8",
    "h100-fp8",
    "h100-fp4",
    "b200-fp4",
}


def test_target_list():
    targets = {t.name: t for t in list_targets()}
    assert set(targets) == EXPECTED
    assert targets["cpu-fp32"].status == "available" and targets["cpu-fp32"].recipe == []
    assert set(targets["cpu-fp32"].gates) <= set(GATES) and targets["cpu-fp32"].gates["min_psnr_db"] == 60
    # Hopper has FP8 but no FP4 tensor cores; Blackwell has NVFP4.
    assert "fp8" in targets["h100-fp4"].capabilities and "nvfp4" not in targets["h100-fp4"].capabilities
    assert "nvfp4" in targets["b200-fp4"].capabilities
    assert "W4A8" in targets["h100-fp4"].description


def test_planned_target_is_refused_clearly():
    with pytest.raises(ConfigError, match=r"declared but not implemented yet.*NVFP4 lowering.*available now: a100"):
        require_available(get_target("b200-fp4"))
    target = get_target("cpu-int8")
    assert [step["pass"] for step in target.recipe] == ["quantize"] and target.gates["min_psnr_db"] > 0
    plan_passes(target.recipe, target.capabilities)
    # Hardware targets compose structure, steps and their format; the loop changes, so distribution gates.
    composed = ["layer_removal", "prune", "recover", "guidance_distill", "progressive_distill", "quantize"]
    formats = {"a100-int8": ("int8", "int8"), "h100-fp8": ("fp8", "fp8"), "h100-fp4": ("int4", "fp8")}
    for name, (weights, activations) in formats.items():
        target = get_target(name)
        require_available(target)
        assert [step["pass"] for step in target.recipe] == composed
        assert target.recipe[-1]["config"]["weights"] == weights
        assert target.recipe[-1]["config"]["activations"] == activations
        gates = {"max_class_agreement_drop", "max_fd_self_shift", "max_fd_digits_shift", "max_success_shortfall"}
        assert set(target.gates) == gates
        assert target.recipe[-1]["config"].get("fallback_formats", []) == (["fp8"] if weights == "int4" else [])
        assert target.recipe[-1]["config"]["max_sample_error"] == 0.05  # end to end: a few-step loop compounds
        # The distribution checks stay on (the CLI tests turn them off for speed, so nothing else would notice):
        # quantization may add 0.005 to the student's shift, the guidance student trains on over 0.01.
        assert target.recipe[-1]["config"]["max_fd_shift_added"] == 0.005
        assert target.recipe[3]["config"]["max_fd_shift"] == 0.01
        plan_passes(target.recipe, target.capabilities)  # every shipped recipe fits its hardware


def test_cpu_steps_keeps_the_guidance_students_distribution_check():
    (guidance,) = [s for s in get_target("cpu-steps").recipe if s["pass"] == "guidance_distill"]
    assert guidance["config"]["max_fd_shift"] == 0.01 and guidance["config"]["max_steps"] > guidance["config"]["steps"]


def test_unknown_target():
    with pytest.raises(ConfigError, match="unknown target 'tpu-v9'"):
        get_target("tpu-v9")


MINE = {
    "name": "mine",
    "status": "available",
    "description": "d",
    "hardware": {"capabilities": ["fp32"]},
    "backend": {"name": "onnxruntime"},
    "recipe": [],
    "gates": {},
}


def test_user_target_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**MINE, "gates": {"min_psnr_db": 40}}))
    assert get_target(str(path)).gates == {"min_psnr_db": 40}
    path.write_text(json.dumps({**MINE, "hardware": {}, "gates": {"min_psnrr": 1}}))
    with pytest.raises(ConfigError, match="unknown gate"):
        get_target(str(path))
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        get_target(str(path))


def test_alternative_recipes_are_checked_like_the_recipe(tmp_path):
    cache = get_target("cpu-cache")
    assert [[s["pass"] for s in r] for r in cache.recipes] == [["guidance", "cache"], ["cache"]]
    # Both recipes keep the cache pass's distribution check on (the CLI tests turn it off for speed).
    assert all(r[-1]["config"]["max_fd_shift"] > 0 for r in cache.recipes)
    for recipe in cache.recipes:
        plan_passes(recipe, cache.capabilities)
    path = tmp_path / "mine.json"
    for alternatives, message in [
        ({"pass": "cache"}, "'alternatives' must be a list"),
        ([{"pass": "cache"}], r"alternatives\[0\] must be a recipe"),
        ([[{"config": {}}]], r"alternatives\[0\]\[0\] must be \{'pass'"),
    ]:
        path.write_text(json.dumps({**MINE, "alternatives": alternatives}))
        with pytest.raises(ConfigError, match=message):
            get_target(str(path))
