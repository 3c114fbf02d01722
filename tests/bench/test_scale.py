"""bench --scale: the geometries the CLI offers, and a family mismatch refused with one line. The replay
itself runs on the cpu-int8 and cpu-prune outputs in tests/optimizer/test_cli_recipes.py."""

import pytest

from bench.scale import GEOMETRIES, compare_at_scale, scaled_recipe
from core.errors import ConfigError
from optimizer.cli.timing import SCALE_GEOMETRIES


def test_the_cli_offers_every_geometry():
    assert set(SCALE_GEOMETRIES) == set(GEOMETRIES)


def test_another_family_is_refused_with_the_geometries_that_fit():
    report = {"model": {"class": "UNet2DModel"}}
    with pytest.raises(ConfigError, match="the artifact is a UNet2DModel, the geometry a DiTTransformer2DModel"):
        compare_at_scale(report, {"name": "onnxruntime"}, GEOMETRIES["dit-b2"], 1, lambda _: None)


def test_the_replayed_recipe_keeps_shapes_and_formats_and_drops_weight_training():
    report = {
        "passes": [
            {"name": "layer_removal", "config": {"blocks": 2, "fraction": 0.0, "criterion": "distortion"}},
            {"name": "prune", "config": {"mlp": 0.25, "criterion": "taylor"}},
            {"name": "recover", "config": {"steps": 600}},
            {"name": "guidance_distill", "config": {"steps": 400}},
            {"name": "quantize", "config": {"weights": "int8", "max_eps_error": 0.02}},
        ],
        "decisions": {"layer_removal": {"removed": [3, 5], "kept": [0, 1, 2, 4, 6, 7]}},
    }
    recipe = scaled_recipe(report)
    assert [s["pass"] for s in recipe] == ["layer_removal", "prune", "quantize"]
    assert recipe[0]["config"] == {"blocks": 0, "fraction": 0.25, "criterion": "last"}
    assert recipe[1]["config"]["criterion"] == "magnitude" and recipe[2]["config"]["max_eps_error"] == 0.0
    assert recipe[2]["config"]["layer_weights"] == {} and recipe[2]["config"]["calibration_inputs"] == 2
    # Formats chosen per layer by the integer program are pinned, not chosen again.
    assigned = {"transformer_blocks.0.ff.net.2": "fp8", "proj_out_2": "fp32"}
    report["decisions"]["quantize"] = {"allocation": {"assigned": assigned}}
    assert scaled_recipe(report)[2]["config"]["layer_weights"] == assigned
    # So are the layers the greedy fallback reverted to fp32.
    report["decisions"]["quantize"] = {"fallback": [{"layer": "pos_embed.proj"}]}
    assert scaled_recipe(report)[2]["config"]["layer_weights"] == {"pos_embed.proj": "fp32"}
    # Nothing removed (a UNet has no stack of same-shape blocks): no layer_removal step to replay.
    report["decisions"]["layer_removal"] = {"removed": [], "kept": []}
    assert [s["pass"] for s in scaled_recipe(report)] == ["prune", "quantize"]


def test_a_linearized_artifact_replays_the_mechanism_on_the_same_share_of_blocks_untrained():
    config = {"kind": "local", "radius": 2.0, "fraction": 0.75, "steps": 300, "min_calibration_psnr_db": 34.0}
    report = {  # 6 blocks replaced, 2 given softmax back under the budget: 4 of 8 replayed, untrained, no budget
        "passes": [{"name": "linearize", "config": config}],
        "decisions": {"linearize": {"replaced": [1, 4, 6, 7], "reverted": [2, 5], "depth": 8}},
    }
    (step,) = scaled_recipe(report)
    replay = {"selection": "last", "fraction": 0.5, "blocks": 0, "steps": 0, "min_calibration_psnr_db": 0.0}
    assert step["config"] == {**config, **replay}
    report["decisions"]["linearize"]["replaced"] = list(range(8))
    assert scaled_recipe(report)[0]["config"]["selection"] == "all"
