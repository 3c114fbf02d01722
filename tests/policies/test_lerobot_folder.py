"""LeRobot diffusion-policy folders load as LeRobot reads them: the denoiser's weights, the DDPM/DDIM plan,
the normalization of LeRobot's processors (both layouts), the chunking; bad folders give one line each."""

from __future__ import annotations

import json

import pytest
import torch
from lerobot_layout import STATS, edit_config, save, tiny_policy

from core import lerobot_folder
from core.environments import pusht
from core.errors import LoadError
from core.loading import load_program


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save(tmp_path_factory.mktemp("policy") / "pusht")


def lerobot_min_max(x: torch.Tensor, stats: dict) -> torch.Tensor:
    """LeRobot's NormalizerProcessorStep, MIN_MAX (normalize_processor.py): 2 (x - min) / (max - min) - 1."""
    lo, hi = stats["min"], stats["max"]
    denom = torch.where(hi - lo == 0, torch.full_like(hi, 1e-8), hi - lo)
    return 2 * (x - lo) / denom - 1


def test_a_policy_folder_loads_with_its_plan_chunking_and_environment(folder):
    program = load_program(folder)
    spec = program.spec
    assert (spec.model_class, spec.sample_shape, spec.sample_axes) == (
        "LeRobotDiffusionUnet",
        (8, 2),
        ("horizon", "action_dim"),
    )
    assert (spec.chunking.n_obs_steps, spec.chunking.n_action_steps, spec.chunking.first) == (2, 4, 1)
    assert [c.name for c in spec.conditioning.observation] == [pusht.STATE, pusht.ENV_STATE]
    assert [c.shape for c in spec.conditioning.observation] == [(2, 2), (2, 16)]
    assert (program.plan.scheduler_class, program.plan.num_inference_steps) == ("DDIMScheduler", 4)
    assert program.plan.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert spec.prediction_type == "epsilon" and program.stages.environment == "pusht"
    expected = tiny_policy().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in program.denoiser.state_dict().items())


@pytest.mark.parametrize("old", [False, True], ids=["processor-files", "buffers-in-weights"])
def test_normalization_is_lerobots_min_max_in_both_layouts(tmp_path, old):
    program = load_program(save(tmp_path / "p", old=old))
    x = torch.rand(5, 2, 2) * 600 - 40
    state = next(c for c in program.spec.conditioning.observation if c.name == pusht.STATE)
    torch.testing.assert_close(state.normalization.normalize(x), lerobot_min_max(x, STATS[pusht.STATE]))
    y = torch.rand(3, 8, 2) * 2 - 1  # the inverse of LeRobot's: (y + 1) / 2 * (max - min) + min
    lo, hi = STATS["action"]["min"], STATS["action"]["max"]
    torch.testing.assert_close(program.spec.output_normalization.denormalize(y), (y + 1) / 2 * (hi - lo) + lo)
    assert any("before lerobot 0.4" in n for n in program.source.notes) == old


def test_a_constant_feature_normalizes_with_lerobots_epsilon(tmp_path):
    from core.lerobot_folder import center_spread

    stats = {"f": {"min": torch.tensor([3.0, 1.0]), "max": torch.tensor([3.0, 5.0])}}
    from core.ir import Normalization

    norm = Normalization(*map(tuple, center_spread(stats, "f", "MIN_MAX", 2, "here")))
    x = torch.tensor([[3.0, 2.0], [3.0, 5.0]])  # the constant feature at its value: LeRobot gives -1
    torch.testing.assert_close(norm.normalize(x), lerobot_min_max(x, stats["f"]))


def test_the_denoisers_parameter_names_are_lerobots(folder):
    """The module tree of LeRobot's DiffusionConditionalUnet1d (modeling_diffusion.py), for two levels."""
    keys = set(load_program(folder).denoiser.state_dict())
    block = ["conv1.block.0", "conv1.block.1", "cond_encoder.1", "conv2.block.0", "conv2.block.1"]
    expected = {"diffusion_step_encoder.1", "diffusion_step_encoder.3"}
    for level in ("down_modules.0", "down_modules.1", "up_modules.0"):
        expected |= {f"{level}.{i}.{b}" for i in (0, 1) for b in block}
    expected |= {f"mid_modules.{i}.{b}" for i in (0, 1) for b in block}
    expected |= {"down_modules.0.0.residual_conv", "down_modules.1.0.residual_conv", "up_modules.0.0.residual_conv"}
    expected |= {"down_modules.0.2", "up_modules.0.2", "final_conv.0.block.0", "final_conv.0.block.1", "final_conv.1"}
    assert keys == {f"{e}.{p}" for e in expected for p in ("weight", "bias")}


def test_the_weights_file_holds_lerobots_prefix(folder):
    from safetensors.torch import load_file

    keys = load_file(str(folder / lerobot_folder.WEIGHTS))
    assert all(k.startswith("diffusion.unet.") for k in keys)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "act"}, "policy type 'act' is not supported"),
        (
            {"input_features": {"observation.image": {"type": "VISUAL", "shape": [3, 96, 96]}}},
            "image observations \\(observation.image\\) are not supported yet",
        ),
        ({"n_action_steps": 8}, "n_action_steps 8 exceeds horizon - n_obs_steps \\+ 1 = 7"),
        ({"noise_scheduler_type": "EULER"}, "noise_scheduler_type 'EULER' is not DDPM or DDIM"),
        ({"prediction_type": "v_prediction"}, "prediction_type 'v_prediction' is not epsilon or sample"),
        ({"horizon": 6}, "horizon 6 must divide by 2\\^len\\(down_dims\\) = 4"),
        ({"normalization_mapping": {"STATE": "QUANTILES"}}, "normalization_mapping.STATE 'QUANTILES'"),
    ],
)
def test_bad_configs_are_refused_in_one_line(tmp_path, change, message):
    folder = save(tmp_path / "p")
    edit_config(folder, **change)
    with pytest.raises(LoadError, match=message):
        load_program(folder)


def test_missing_stats_are_refused(tmp_path):
    folder = save(tmp_path / "p")
    for name in folder.glob("policy_*"):
        name.unlink()
    with pytest.raises(LoadError, match=r"observation\.state is normalized MIN_MAX but its stats lack min, max"):
        load_program(folder)


def test_weights_outside_the_denoiser_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save(tmp_path / "p")
    state = load_file(str(folder / lerobot_folder.WEIGHTS))
    state["diffusion.rgb_encoder.out.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / lerobot_folder.WEIGHTS))
    with pytest.raises(LoadError, match="weights outside the denoiser are not supported"):
        load_program(folder)


def test_a_diffusers_model_folder_is_not_read_as_a_policy(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet1DModel", "type": "x"}))
    assert not lerobot_folder.is_policy(tmp_path)


def test_pruned_channels_of_the_1d_unet_compute_what_zeroing_them_computes(folder):
    """The adapter's channel sites (conv, GroupNorm groups, FiLM scale and bias rows, the next conv's inputs)
    shrink exactly; the block splits its FiLM by the new width."""
    import copy

    from helpers import assert_same_actions

    from core import surgery
    from core.adapters import adapter_for

    program = load_program(folder)
    masked, pruned = copy.deepcopy(program.denoiser), copy.deepcopy(program.denoiser)
    block = masked.down_modules[1][0]
    norm = block.conv1.block[1]
    size = norm.num_channels // norm.num_groups
    with torch.no_grad():
        block.conv2.block[0].weight[:, size : 2 * size] = 0  # group 1
    sites = {name: site for name, _, site in adapter_for("LeRobotDiffusionUnet").prunable_units(pruned)}
    assert len(sites) == 2 * 2 + 2 + 2 * 1  # two per down level, two in the middle, two per up level
    surgery.prune_channels(sites["down_modules.1.0"], [g for g in range(norm.num_groups) if g != 1])
    assert pruned.down_modules[1][0].out_channels == norm.num_channels - size
    assert_same_actions(program, masked, pruned)


def test_the_prune_pass_removes_channel_groups_of_the_1d_unet(folder):
    from helpers import run_recipe, with_pusht_observations

    from calibration.capture import capture_calibration

    program = with_pusht_observations(load_program(folder))
    calibration = capture_calibration(program, 2)
    recipe = [{"pass": "prune", "config": {"channels": 0.25, "criterion": "distortion", "samples": 16}}]
    pruned = run_recipe(program, calibration, recipe)
    widths = [b.conv1.block[1].num_groups for b in pruned.denoiser.down_modules[0][:2]]
    assert widths == [3, 3]  # 4 groups, one removed
    removed = pruned.decision("prune").to_dict()
    assert removed["parameters_after"] < removed["parameters_before"]
