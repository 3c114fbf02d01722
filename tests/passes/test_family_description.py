"""Issue 34: a family is described by its adapter, so adding one is one file (tests/toy_family.py) and no
technique changes. The toy family's blocks live in `layers` and its depth in `depth`, names no technique
knows; the cache, prune, layer_removal, quantize and linearize passes run on it from its description alone.
Random weights: mechanics (each pass's structural effect, and the cached graph variant equal to the full
forward where the schedule refreshes), never fidelity."""

import dataclasses

import pytest
import torch
from helpers import run_recipe
from toy_family import ADAPTER, StackNet

from calibration.capture import capture_calibration
from core.adapters import adapter_for, adapters, denoiser_module, register
from core.cache_variants import BlockRangeVariant
from core.caching import levels, variant_module
from core.loading import program_from_model
from core.quantized import quantized_layers


@pytest.fixture(scope="module")
def toy():
    register(ADAPTER)
    torch.manual_seed(0)
    sampling = {"scheduler": "ddim", "num_inference_steps": 6, "guidance_scale": 2.0}
    program = program_from_model(StackNet(), sampling=sampling)
    return program, capture_calibration(program, 2)


def test_a_registered_family_is_loaded_and_described_by_its_adapter(toy):
    program, _ = toy
    assert adapter_for("StackNet") is ADAPTER and ADAPTER in adapters().values()
    assert program.spec.family == "stack-net" and program.spec.blocks == tuple(f"layers.{i}" for i in range(4))
    assert levels(program) == 4
    with pytest.raises(ValueError, match="registered already"):
        register(dataclasses.replace(ADAPTER))


def test_the_generic_block_range_variant_runs_the_familys_own_forward(toy):
    program, _ = toy
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([900.0, 100.0]), torch.tensor([3, 10])
    reference = denoiser_module(program)(x, t, y)
    full = variant_module(program, "full", (1, 3))
    assert isinstance(full, BlockRangeVariant)
    out, stored = full(x, t, y)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    cached = variant_module(program, "cached", (1, 3))(x, t, y, stored)
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)  # its own residual: the same output


def test_every_structural_and_numeric_pass_runs_on_the_family_from_its_description(toy):
    program, calibration = toy
    removed = run_recipe(program, calibration, [{"pass": "layer_removal", "config": {"blocks": 1}}])
    assert len(removed.denoiser.layers) == 3 == removed.denoiser.config.depth
    assert removed.spec.blocks == tuple(f"layers.{i}" for i in range(3))

    pruned = run_recipe(program, calibration, [{"pass": "prune", "config": {"heads": 0.5, "mlp": 0.25}}])
    decision = pruned.decision("prune").to_dict()
    assert decision["fractions"] == {"heads": 0.5, "mlp": 0.25}  # the kinds its adapter lists, no channels
    assert all(block.attn1.heads == 1 for block in pruned.denoiser.layers)
    assert all(block.ff.net[2].in_features == 96 for block in pruned.denoiser.layers)  # 128 hidden units - 25%

    recipe = [{"pass": "cache", "config": {"flops_budget": 0.8}}]
    cached = run_recipe(program, calibration, recipe)
    assert cached.plan.cache is not None and cached.plan.cache.family == "stack-net"
    assert cached.decision("cache").to_dict()["flops_vs_original"] <= 0.8

    quantize = {"weights": "int8", "activations": "int8", "calibration": "timestep"}
    quantized = run_recipe(program, calibration, [{"pass": "quantize", "config": quantize}], frozenset({"int8"}))
    layers = quantized_layers(quantized.denoiser)
    assert "layers.0.attn1.to_q" in layers and "head" in layers
    assert not any(name.startswith(("time_embedding", "class_embedding")) for name in layers)  # temporal: fp32

    linear = {"kind": "linear", "selection": "all", "steps": 0}
    linearized = run_recipe(program, calibration, [{"pass": "linearize", "config": linear}])
    processors = {type(block.attn1.processor).__name__ for block in linearized.denoiser.layers}
    assert processors == {"LinearAttention"}
    assert linearized.decision("linearize").to_dict()["depth"] == 4
