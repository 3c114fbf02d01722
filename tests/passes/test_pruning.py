"""Issue 5: width pruning, layer removal and recovery distillation on the shipped (trained) models."""

import copy

import pytest
import torch
from helpers import run_recipe

from bench.prune_compare import compare_pruning
from calibration import capture as calib
from calibration.capture import evaluation_set
from core import surgery
from core.adapters import denoiser_module, torch_denoise
from core.errors import ConfigError
from core.flops import plan_flops
from passes.manager import plan_passes
from verify.fidelity import per_step_error, replay_psnr


@pytest.fixture(scope="module")
def calibrations(dit_program, unet_program):
    return {
        "dit": calib.capture(dit_program, *evaluation_set(dit_program, 8, 10_000)),
        "unet": calib.capture(unet_program, *evaluation_set(unet_program, 8, 10_000)),
    }


def run(program, calibration, recipe, reference=None):
    return run_recipe(program, calibration, recipe, reference=reference)


def eps_error(program, calibration):
    errors = per_step_error(calibration, torch_denoise(program))
    return sum(errors) / len(errors)


def inputs():
    torch.manual_seed(1)
    return torch.randn(3, 1, 16, 16), torch.tensor([900.0, 400.0, 20.0]), torch.tensor([1, 5, 10])


def zeroed(weight, dim, index):
    w = weight.detach().clone()
    w.index_fill_(dim, index, 0.0)
    return torch.nn.Parameter(w)


def test_surgery_equals_zeroing_the_removed_units(dit_program, unet_program):
    """Physically removed units compute what the original computes with those units' weights zeroed."""
    x, t, y = inputs()
    # DiT: heads 1 and 4 of block 0, MLP units 0..95 of block 1
    masked, pruned = copy.deepcopy(dit_program.denoiser), copy.deepcopy(dit_program.denoiser)
    attn, ff = masked.transformer_blocks[0].attn1, masked.transformer_blocks[1].ff
    gone = torch.cat([torch.arange(16, 32), torch.arange(64, 80)])
    attn.to_out[0].weight = zeroed(attn.to_out[0].weight, 1, gone)
    ff.net[2].weight = zeroed(ff.net[2].weight, 1, torch.arange(96))
    surgery.prune_heads(pruned.transformer_blocks[0].attn1, [0, 2, 3, 5])
    surgery.prune_mlp(surgery.MlpSite.feed_forward(pruned.transformer_blocks[1].ff), list(range(96, 384)))
    assert pruned.transformer_blocks[1].ff.net[0].proj.weight.shape == (288, 96)
    assert pruned.transformer_blocks[0].attn1.to_q.weight.shape == (64, 96)
    with torch.no_grad():
        expected = denoiser_module(dit_program.replace(denoiser=masked))(x, t, y)
        got = denoiser_module(dit_program.replace(denoiser=pruned))(x, t, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # UNet resnet: GroupNorm groups 0 and 5 (of 8) of the inner channels
    masked, pruned = copy.deepcopy(unet_program.denoiser), copy.deepcopy(unet_program.denoiser)
    resnet = masked.down_blocks[1].resnets[0]
    size = resnet.norm2.num_channels // resnet.norm2.num_groups
    gone = torch.cat([torch.arange(0, size), torch.arange(5 * size, 6 * size)])
    resnet.conv2.weight = zeroed(resnet.conv2.weight, 1, gone)
    surgery.prune_channels(surgery.ChannelSite.resnet(pruned.down_blocks[1].resnets[0]), [1, 2, 3, 4, 6, 7])
    assert pruned.down_blocks[1].resnets[0].conv1.weight.shape[0] == 6 * size
    with torch.no_grad():
        expected = denoiser_module(unet_program.replace(denoiser=masked))(x, t, y)
        got = denoiser_module(unet_program.replace(denoiser=pruned))(x, t, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_timestep_aware_importance_beats_magnitude_on_the_trained_dit(dit_program, calibrations):
    cal = calibrations["dit"]
    errors = {}
    for criterion in ("taylor", "distortion", "magnitude"):
        pruned = run(dit_program, cal, [{"pass": "prune", "config": {"mlp": 0.25, "criterion": criterion}}])
        assert all(b.ff.net[0].proj.out_features == 288 for b in pruned.denoiser.transformer_blocks)
        assert pruned.decision("prune").parameters_after < pruned.decision("prune").parameters_before
        errors[criterion] = eps_error(pruned, cal)
    assert dit_program.denoiser.transformer_blocks[0].ff.net[0].proj.out_features == 384  # input untouched
    assert errors["taylor"] < errors["magnitude"] and errors["distortion"] < errors["magnitude"]


def test_heads_prune_and_the_unet_prunes_whole_groups(dit_program, unet_program, calibrations):
    pruned = run(dit_program, calibrations["dit"], [{"pass": "prune", "config": {"heads": 0.34, "mlp": 0.0}}])
    assert all(b.attn1.heads == 4 for b in pruned.denoiser.transformer_blocks)
    unet = run(unet_program, calibrations["unet"], [{"pass": "prune", "config": {"channels": 0.25}}])
    resnets = [m for m in unet.denoiser.modules() if type(m).__name__ == "ResnetBlock2D"]
    originals = [m for m in unet_program.denoiser.modules() if type(m).__name__ == "ResnetBlock2D"]
    for new, old in zip(resnets, originals, strict=True):
        assert new.norm2.num_groups == old.norm2.num_groups - round(old.norm2.num_groups * 0.25)
        assert new.conv2.out_channels == old.conv2.out_channels  # block outputs keep their shape
    assert plan_flops(unet)["per_image"] < plan_flops(unet_program)["per_image"]


def test_layer_removal_drops_the_least_distorting_blocks(dit_program, calibrations):
    cal = calibrations["dit"]
    ours = run(dit_program, cal, [{"pass": "layer_removal", "config": {"blocks": 2}}])
    decision = ours.decision("layer_removal").to_dict()
    scores = decision["distortion_by_block"]
    assert decision["removed"] == sorted(sorted(range(8), key=lambda b: scores[b])[:2])
    assert len(ours.denoiser.transformer_blocks) == 6 and ours.denoiser.config.num_layers == 6
    assert ours.spec.blocks == tuple(f"transformer_blocks.{i}" for i in range(6))
    last = run(dit_program, cal, [{"pass": "layer_removal", "config": {"blocks": 2, "criterion": "last"}}])
    assert last.decision("layer_removal").removed == [6, 7]
    assert eps_error(ours, cal) < eps_error(last, cal)
    budget = run(dit_program, cal, [{"pass": "layer_removal", "config": {"blocks": 0, "max_distortion": 0.05}}])
    removed = budget.decision("layer_removal").removed
    assert removed and sum(scores[b] for b in removed) <= 0.05
    quarter = run(dit_program, cal, [{"pass": "layer_removal", "config": {"fraction": 0.25}}])  # 8 -> floor(2)
    assert quarter.decision("layer_removal").removed == decision["removed"]


def test_layer_removal_on_a_unet_says_it_does_not_apply(unet_program, calibrations):
    result = run(unet_program, calibrations["unet"], [{"pass": "layer_removal", "config": {"blocks": 2}}])
    assert "no transformer blocks" in result.decision("layer_removal").skipped
    assert result.denoiser is unet_program.denoiser


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ([{"pass": "prune", "config": {"mlp": 1.0}}], "in \\[0, 1\\)"),
        ([{"pass": "prune", "config": {"criterion": "random"}}], "unknown criterion"),
        ([{"pass": "layer_removal", "config": {"blocks": 0}}], "set blocks"),
        ([{"pass": "layer_removal", "config": {"fraction": 1.0}}], "fraction must be in \\[0, 1\\)"),
        ([{"pass": "recover", "config": {"steps": 0}}], "steps >= 1"),
        ([{"pass": "recover"}], "needs a structure pass before it"),
        ([{"pass": "prune"}, {"pass": "prune"}], "appears twice"),
    ],
)
def test_bad_pruning_configs(recipe, message):
    with pytest.raises(ConfigError, match=message):
        plan_passes(recipe, frozenset({"fp32"}))


def test_pruning_errors(dit_program, unet_program, calibrations):
    with pytest.raises(ConfigError, match=r"fraction 0\.1 of 8 blocks removes none"):
        plan_passes([{"pass": "layer_removal", "config": {"fraction": 0.1}}], frozenset({"fp32"}), program=dit_program)
    with pytest.raises(ConfigError, match="nothing to remove: with these channels fractions"):
        run(unet_program, calibrations["unet"], [{"pass": "prune", "config": {"channels": 0.0}}])
    with pytest.raises(ConfigError, match="nothing to remove: with these heads / cross_heads / mlp fractions"):
        run(dit_program, calibrations["dit"], [{"pass": "prune", "config": {"mlp": 0.001}}])
    with pytest.raises(ConfigError, match="cannot remove 8 of 8"):
        run(dit_program, calibrations["dit"], [{"pass": "layer_removal", "config": {"blocks": 8}}])
    with pytest.raises(ConfigError, match="'recover' needs a structure pass"):
        run(dit_program, calibrations["dit"], [{"pass": "recover"}])


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_recovery_distillation_brings_the_pruned_model_back(family, request, calibrations):
    program, cal = request.getfixturevalue(f"{family}_program"), calibrations[family]
    recipe = [{"pass": "prune", "config": {"mlp": 0.25, "channels": 0.25}}]
    if family == "dit":
        recipe.insert(0, {"pass": "layer_removal", "config": {"blocks": 2}})
    pruned = run(program, cal, recipe)
    config = {"steps": 40, "batch": 32, "teacher_samples": 16}
    recovered = run(pruned, cal, [{"pass": "recover", "config": config}], reference=program)
    notes = recovered.decision("recover").to_dict()
    assert notes["steps"] == 40 and notes["loss_last"] < notes["loss_first"]
    assert notes["feature_pairs"] == len(program.spec.blocks) - (2 if family == "dit" else 0)
    assert eps_error(recovered, cal) < eps_error(pruned, cal)
    assert replay_psnr(recovered, cal) > replay_psnr(pruned, cal)
    # Lowered and run in ORT: the cpu-prune CLI test (DiT) and test_text_families (SD, PixArt).


def test_recovery_is_reproducible_and_keeps_labels(dit_program, calibrations):
    """Same inputs, same weights: the student trains in eval mode, so DiT's 10% class-label dropout
    (train mode only, drawn from the global RNG) never corrupts what it learns."""
    cal = calibrations["dit"]
    pruned = run(dit_program, cal, [{"pass": "prune", "config": {"mlp": 0.25, "criterion": "magnitude"}}])
    recipe = [{"pass": "recover", "config": {"steps": 3, "batch": 8, "teacher_samples": 2}}]
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        recovered = run(pruned, cal, recipe, reference=dit_program)
        results.append(recovered.denoiser.state_dict())
    assert results[0].keys() == results[1].keys()
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[1][name]), name
    assert not recovered.denoiser.training


def test_prune_compare_lowers_and_times_every_row(tiny_digits_program):
    from bench.prune_compare import markdown_table

    rows = [
        ("MLP -25%, magnitude", [{"pass": "prune", "config": {"mlp": 0.25, "criterion": "magnitude"}}]),
        ("over budget", [{"pass": "linearize", "config": {"steps": 0, "min_calibration_psnr_db": 199.0}}]),
    ]
    results = compare_pruning(
        tiny_digits_program, 4, 2, lambda it, **_: it, lambda _: None, rows=rows, latency_repeats=2
    )
    original, pruned, failed = results
    assert original["name"] == "original" and original["ort_speedup"] == 1.0
    assert pruned["parameters"] < original["parameters"] and pruned["onnx_bytes"] < original["onnx_bytes"]
    assert pruned["flops_per_image"] < original["flops_per_image"] and pruned["ort_step_ms"] > 0
    # A row whose budget this model cannot meet fails alone; the comparison goes on.
    assert "under min_calibration_psnr_db 199.0" in failed["failed"] and "ort_step_ms" not in failed
    table = markdown_table(results)
    assert "MLP -25%, magnitude" in table and "| over budget | failed: linearize: with only block" in table
