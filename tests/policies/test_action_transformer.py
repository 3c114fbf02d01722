"""The transformer action denoiser (core.networks.action_transformer) is a family of its own: loaded from our
checkpoint format with its environment, conditioned on the observation history like LeRobot's UNet, and
described by its adapter so block caching (BAC) and layer removal run on it without naming it. Random
weights: mechanics (structure, the cached variant equal to the full forward where it refreshes, ORT equal to
torch in closed loop), never fidelity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_same_actions, run_recipe, tiny_transformer_policy, with_pusht_observations

from calibration.capture import capture_calibration
from core.adapters import denoiser_module
from core.cache_variants import BlockRangeVariant
from core.caching import variant_module
from core.errors import EXIT_PASS, LoadError
from core.loading import load_program
from optimizer.cli import main

STATE, ENV_STATE = "observation.state", "observation.environment_state"


@pytest.fixture(scope="module")
def program(transformer_checkpoint):
    return load_program(transformer_checkpoint)


def test_a_transformer_policy_loads_with_its_observations_chunking_and_environment(program):
    spec = program.spec
    assert spec.family == "action-transformer" and spec.sample_shape == (8, 2)
    assert spec.blocks == tuple(f"transformer_blocks.{i}" for i in range(4))
    assert spec.conditioning.input_names == (STATE, ENV_STATE)
    assert (spec.chunking.n_obs_steps, spec.chunking.n_action_steps) == (2, 4)
    assert spec.output_normalization.center == (256.0, 256.0) and program.stages.environment == "pusht"
    x, t = torch.randn(3, 8, 2), torch.tensor([90.0, 40.0, 1.0])
    state, env_state = torch.randn(3, 2, 2), torch.randn(3, 2, 16)
    want = program.denoiser(x, t, torch.cat([state, env_state], dim=-1).flatten(1))
    torch.testing.assert_close(denoiser_module(program)(x, t, state, env_state), want, rtol=0, atol=0)


def test_a_bad_environment_field_or_config_is_one_line(tmp_path):
    weights = tmp_path / "p.safetensors"
    tiny_transformer_policy(weights)
    meta = json.loads(weights.with_suffix(".json").read_text())
    meta["environment"] = 3
    weights.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="environment"):
        load_program(weights)
    tiny_transformer_policy(weights, num_layers=2000)
    with pytest.raises(LoadError, match="num_layers"):
        load_program(weights)


def test_block_caching_reuses_a_range_of_the_stack_through_the_generic_variant(program):
    x, t = torch.randn(2, 8, 2), torch.tensor([90.0, 10.0])
    obs = (torch.randn(2, 2, 2), torch.randn(2, 2, 16))
    reference = denoiser_module(program)(x, t, *obs)
    full = variant_module(program, "full", (1, 3))
    assert isinstance(full, BlockRangeVariant)
    out, stored = full(x, t, *obs)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    cached = variant_module(program, "cached", (1, 3))(x, t, *obs, stored)
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)  # its own residual: the same output


def test_layer_removal_cache_and_quantize_run_on_the_transformer_from_its_description(program):
    program = with_pusht_observations(program)
    calibration = capture_calibration(program, 2)
    removed = run_recipe(program, calibration, [{"pass": "layer_removal", "config": {"blocks": 1}}])
    assert len(removed.denoiser.transformer_blocks) == 3 == removed.denoiser.config.num_layers
    assert removed.spec.blocks == tuple(f"transformer_blocks.{i}" for i in range(3))
    cached = run_recipe(program, calibration, [{"pass": "cache", "config": {"flops_budget": 0.8}}])
    assert cached.plan.cache is not None and cached.plan.cache.family == "action-transformer"
    assert cached.decision("cache").to_dict()["flops_vs_original"] <= 0.8
    quantize = {"weights": "int8", "activations": "int8", "calibration": "timestep"}
    quantized = run_recipe(program, calibration, [{"pass": "quantize", "config": quantize}], frozenset({"int8"}))
    from core.quantized import quantized_layers

    layers = quantized_layers(quantized.denoiser)
    assert "transformer_blocks.0.attn.to_q" in layers and "transformer_blocks.3.ff.0" in layers
    assert not any(name.startswith("time_embed") for name in layers)  # temporal: fp32


def test_optimize_judges_the_transformer_policy_closed_loop(transformer_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["--target", "cpu-fp32", "--out", str(out), "--episodes", "2", "--samples", "8"]
    args += ["--calibration-samples", "4", "--latency-repeats", "0", "--seed-sets", "1"]
    result = CliRunner().invoke(main, [str(transformer_checkpoint), *args])
    assert result.exit_code == EXIT_PASS, result.output
    verification = json.loads((out / "report.json").read_text())["verification"]
    assert verification["episodes"] == 2 and verification["policy_calls"] == 75
    assert verification["success_rate"] == verification["success_rate_reference"]  # ORT = torch, same noise
    assert verification["action_rmse_mean"] < 1e-2 < 1.0 < verification["action_rmse_floor"]


def test_the_zoos_policies_load_as_their_families():
    from zoo import POLICIES

    transformer, unet = load_program(POLICIES["transformer"]), load_program(POLICIES["unet"])
    assert transformer.spec.family == "action-transformer" and len(transformer.spec.blocks) == 6
    assert unet.spec.family == "lerobot-diffusion"
    for program in (transformer, unet):
        assert program.stages.environment == "pusht" and program.plan.num_inference_steps == 100
        assert program.spec.conditioning.input_names == (STATE, ENV_STATE)
        assert program.spec.output_normalization is not None
    record = json.loads(POLICIES["transformer"].with_suffix(".record.json").read_text())
    assert record["command"].startswith("python -m zoo policy --network transformer")


def test_pruned_heads_and_mlp_units_compute_what_zeroing_them_computes(program):
    """The adapter's sites (self-attention heads, MLP units of ff = Linear, GELU, Linear) shrink exactly."""
    from core import surgery
    from core.adapters import adapter_for

    masked, pruned = copy.deepcopy(program.denoiser), copy.deepcopy(program.denoiser)
    attn, ff = masked.transformer_blocks[0].attn, masked.transformer_blocks[1].ff
    size = attn.inner_dim // attn.heads
    with torch.no_grad():
        attn.to_out[0].weight[:, size : 2 * size] = 0  # head 1
        ff[2].weight[:, :5] = 0  # units 0..4
    sites = {name: site for name, _, site in adapter_for("ActionTransformer").prunable_units(pruned)}
    surgery.prune_heads(sites["transformer_blocks.0.attn"], [h for h in range(attn.heads) if h != 1])
    surgery.prune_mlp(sites["transformer_blocks.1.ff"], list(range(5, ff[2].in_features)))
    assert pruned.transformer_blocks[1].ff[0].out_features == ff[2].in_features - 5
    assert_same_actions(program, masked, pruned)


def test_the_prune_pass_removes_heads_and_mlp_units_of_the_transformer(program):
    program = with_pusht_observations(program)
    calibration = capture_calibration(program, 2)
    recipe = [{"pass": "prune", "config": {"heads": 0.5, "mlp": 0.5, "criterion": "taylor", "samples": 16}}]
    pruned = run_recipe(program, calibration, recipe)
    blocks = pruned.denoiser.transformer_blocks
    assert [b.attn.heads for b in blocks] == [1] * 4 and [b.ff[2].in_features for b in blocks] == [16] * 4
    removed = pruned.decision("prune").to_dict()
    assert removed["parameters_after"] < removed["parameters_before"]
