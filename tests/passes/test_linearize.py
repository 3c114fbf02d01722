"""Issue 18: attention linearization on the shipped (trained) DiT: blocks chosen by sensitivity, only the
replaced layers distilled, against the naive variants (no distillation; every block replaced). Short
budgets here; the full runs are benchmark commands (BENCHMARKS.md)."""

import pytest
import torch
from helpers import run_recipe

from calibration import capture as calib
from calibration.capture import evaluation_set
from core.attention import LinearAttention, LocalAttention
from core.errors import ConfigError
from core.flops import plan_flops
from passes.manager import plan_passes
from verify.fidelity import replay_psnr

SHORT = {"steps": 40, "batch": 16, "samples": 256, "teacher_samples": 8, "scoring_samples": 64}


@pytest.fixture(scope="module")
def calibration(dit_program):
    return calib.capture(dit_program, *evaluation_set(dit_program, 8, 10_000))


def linearize(program, calibration, **config):
    return run_recipe(program, calibration, [{"pass": "linearize", "config": {**SHORT, **config}}])


def test_linear_attention_by_sensitivity_distilled_beats_the_naive_variants(dit_program, calibration):
    ours = linearize(dit_program, calibration, fraction=0.5)
    notes = ours.decision("linearize").to_dict()
    scores, replaced = notes["sensitivity_by_block"], notes["replaced"]
    assert len(scores) == len(dit_program.denoiser.transformer_blocks) and len(replaced) == len(scores) // 2
    assert max(scores[b] for b in replaced) <= min(s for b, s in enumerate(scores) if b not in replaced)
    assert notes["steps"] == 40 and notes["loss_last"] < notes["loss_first"]
    for b, block in enumerate(ours.denoiser.transformer_blocks):
        assert isinstance(block.attn1.processor, LinearAttention) == (b in replaced)
    # Only the replaced layers trained: everything else is the original's, bit for bit.
    original = dict(dit_program.denoiser.named_parameters())
    for name, value in ours.denoiser.named_parameters():
        trained = any(name.startswith(f"transformer_blocks.{b}.attn1.") for b in replaced)
        assert trained or torch.equal(value, original[name]), name
    undistilled = linearize(dit_program, calibration, fraction=0.5, steps=0)
    every_block = linearize(dit_program, calibration, selection="all")
    psnr = {name: replay_psnr(p, calibration) for name, p in [("ours", ours), ("undistilled", undistilled)]}
    psnr["all"] = replay_psnr(every_block, calibration)
    assert psnr["ours"] > psnr["undistilled"] and psnr["ours"] > psnr["all"], psnr
    assert "replaced by linear attention (relu kernel) + depthwise conv" in ours.decision("linearize").markdown()[0]


def test_local_attention_with_a_halo_over_the_whole_grid_saves_no_flops(dit_program, calibration):
    local = linearize(dit_program, calibration, kind="local", radius=2.0, tile=4, selection="all", steps=0)
    processors = [b.attn1.processor for b in local.denoiser.transformer_blocks]
    assert all(isinstance(p, LocalAttention) and p.keys_per_query == 64 for p in processors)  # (4 + 4)^2 of 64
    # At 64 tokens a 4x4 tile's halo already holds every token: no FLOPs saved (the sweep shows where it pays).
    assert plan_flops(local)["per_image"] >= plan_flops(dit_program)["per_image"]


def test_bad_configs_are_refused(unet_program):
    with pytest.raises(ConfigError, match="kind in"):
        plan_passes([{"pass": "linearize", "config": {"kind": "sparse"}}], frozenset({"fp32"}))
    with pytest.raises(ConfigError, match="not a unet"):
        plan_passes([{"pass": "linearize"}], frozenset({"fp32"}), program=unet_program)
