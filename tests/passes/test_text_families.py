"""The passes on text-conditioned families (SD-style UNet, PixArt): mechanics on tiny random pipelines
(exactness of the surgery and the cache variants, lowering); fidelity is measured on the trained zoo."""

import copy
import dataclasses
import json

import pytest
import torch
from helpers import lower, run_recipe

from backends.registry import open_runner
from calibration.capture import capture_calibration
from core import surgery
from core.adapters import denoiser_module
from core.caching import variant_module
from core.conditions import encode
from core.loading import load_program
from core.pixels import to_images
from core.stages import decode
from core.variants import sample_program
from verify.metrics import psnr

PROMPTS = ["a thick seven", "a thin one"]


@pytest.fixture(scope="module")
def programs(text_folders):
    loaded = {}
    for family, folder in text_folders.items():
        program = load_program(folder)
        loaded[family] = program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=6))
    return loaded


@pytest.fixture(scope="module")
def calibrations(programs):
    return {family: capture_calibration(p, 2) for family, p in programs.items()}


def inputs(program, batch=2):
    torch.manual_seed(1)
    x = torch.randn(batch, *program.spec.sample_shape)
    cond = encode(program, PROMPTS[:batch], batch).cond
    return x, torch.tensor([900.0, 300.0][:batch]), cond


@pytest.mark.parametrize("cross_kv", ["fp32", "quantize"])
def test_quantize_keeps_cross_attention_kv_fp32_unless_asked(programs, calibrations, cross_kv):
    for family, program in programs.items():
        recipe = [{"pass": "quantize", "config": {"calibration_inputs": 16, "cross_kv": cross_kv}}]
        q = run_recipe(program, calibrations[family], recipe, capabilities=frozenset({"fp32", "int8"}))
        decision = q.decision("quantize")
        assert decision.quantized_layers > 0 and decision.error_after_fallback < 0.5
        kept = [n for n in decision.kept_fp32 if n.endswith(("attn2.to_k", "attn2.to_v"))]
        attn2 = [n for n, _ in program.denoiser.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
        assert sorted(kept) == (sorted(attn2) if cross_kv == "fp32" else [])


@pytest.mark.parametrize(("family", "regions"), [("pixart", [(0, 1), (0, 2), (1, 2)]), ("sd", [(1, 2)])])
def test_cache_variants_restate_the_forward(programs, family, regions):
    program = programs[family]
    x, t, cond = inputs(program)
    names = program.spec.conditioning.input_names
    args = [cond[n] for n in names]
    with torch.no_grad():
        reference = denoiser_module(program)(x, t, *args)
        for region in regions:
            out, stored = variant_module(program, "full", region)(x, t, *args)
            assert torch.equal(out, reference), region
            cached = variant_module(program, "cached", region)(x, t, *args, stored)
            torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-5)
            other = variant_module(program, "full", region)(x, t.flip(0), *args)[1]
            assert not torch.allclose(variant_module(program, "cached", region)(x, t, *args, other), reference)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_cache_schedule_lowers_and_matches_torch(programs, calibrations, family, tmp_path, request):
    if family == "sd":  # lowered once for this test and the serving test
        cached, tmp_path = request.getfixturevalue("cached_sd_artifact")
    else:
        cached = run_recipe(
            programs[family], calibrations[family], [{"pass": "cache", "config": {"flops_budget": 0.9}}]
        )
        lower(cached, tmp_path)
    assert cached.plan.cache is not None and cached.plan.cache.family == programs[family].spec.family
    assert [g["file"] for g in json.loads((tmp_path / "plan.json").read_text())["graphs"].values()] == [
        "denoiser_full.onnx",
        "denoiser_cached.onnx",
    ]
    runner = open_runner(tmp_path)
    candidate = runner.decode(runner.sample([0, 1], PROMPTS))
    reference = decode(cached.stages, sample_program(cached, [0, 1], PROMPTS))
    assert psnr(to_images(reference), to_images(candidate)).min() >= 60.0


def test_layer_removal_on_a_transformer_stack_and_not_on_a_unet(programs, calibrations):
    removed = run_recipe(
        programs["pixart"], calibrations["pixart"], [{"pass": "layer_removal", "config": {"blocks": 1}}]
    )
    assert len(removed.denoiser.transformer_blocks) == 1 and removed.spec.block_origin in ((0,), (1,))
    skipped = run_recipe(programs["sd"], calibrations["sd"], [{"pass": "layer_removal", "config": {"blocks": 1}}])
    assert "no transformer blocks to remove" in skipped.decision("layer_removal").skipped


def test_gated_mlp_and_cross_attention_surgery_is_exact(programs):
    """SD's GEGLU MLP keeps both halves of each kept unit; cross-attention heads go with their K/V rows."""
    program = programs["sd"]
    x, t, cond = inputs(program)
    masked, pruned = copy.deepcopy(program.denoiser), copy.deepcopy(program.denoiser)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    ff, attn2 = masked.get_submodule(f"{block}.ff"), masked.get_submodule(f"{block}.attn2")
    inner, head = ff.net[2].in_features, attn2.inner_dim // attn2.heads
    gone = torch.arange(0, inner, 2)
    ff.net[2].weight = torch.nn.Parameter(ff.net[2].weight.detach().index_fill(1, gone, 0.0))
    heads_gone = torch.arange(0, head)  # head 0
    attn2.to_out[0].weight = torch.nn.Parameter(attn2.to_out[0].weight.detach().index_fill(1, heads_gone, 0.0))
    surgery.prune_mlp(surgery.MlpSite.feed_forward(pruned.get_submodule(f"{block}.ff")), list(range(1, inner, 2)))
    surgery.prune_heads(pruned.get_submodule(f"{block}.attn2"), list(range(1, attn2.heads)))
    assert pruned.get_submodule(f"{block}.ff").net[0].proj.out_features == inner  # 2 x (inner / 2)
    args = [cond[n] for n in program.spec.conditioning.input_names]
    with torch.no_grad():
        expected = denoiser_module(program.replace(denoiser=masked))(x, t, *args)
        got = denoiser_module(program.replace(denoiser=pruned))(x, t, *args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_prune_with_cross_heads_then_recover_lowers(programs, calibrations, family, tmp_path):
    recipe = [
        {"pass": "prune", "config": {"mlp": 0.25, "cross_heads": 0.5, "samples": 16}},
        {"pass": "recover", "config": {"steps": 3, "batch": 4, "teacher_samples": 1}},
    ]
    pruned = run_recipe(programs[family], calibrations[family], recipe)
    decision = pruned.decision("prune")
    assert (
        any(name.endswith("attn2") for name in decision.removed)
        and decision.parameters_after < decision.parameters_before
    )
    lower(pruned, tmp_path)
    runner = open_runner(tmp_path)
    candidate = runner.decode(runner.sample([0], PROMPTS[:1]))
    reference = decode(pruned.stages, sample_program(pruned, [0], PROMPTS[:1]))
    assert psnr(to_images(reference), to_images(candidate)).min() >= 60.0
