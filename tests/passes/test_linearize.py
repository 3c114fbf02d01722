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


def test_a_psnr_budget_reverts_the_most_sensitive_blocks_until_it_is_met(dit_program, calibration):
    """Undistilled (fast, and far under budget with 6 of 8 blocks replaced): blocks go back to softmax,
    most sensitive first, each revert measured end to end, until the calibration PSNR reaches 28 dB."""
    budgeted = linearize(dit_program, calibration, fraction=0.75, steps=0, min_calibration_psnr_db=28.0)
    notes = budgeted.decision("linearize").to_dict()
    scores, replaced, reverted, trail = (
        notes[k] for k in ("sensitivity_by_block", "replaced", "reverted", "calibration_psnr_db")
    )
    assert reverted and len(replaced) + len(reverted) == 6 and len(trail) == len(reverted) + 1
    assert [scores[b] for b in reverted] == sorted((scores[b] for b in reverted), reverse=True)
    assert min(scores[b] for b in reverted) >= max(scores[b] for b in replaced)
    assert max(trail[:-1]) < 28.0 <= trail[-1] == pytest.approx(replay_psnr(budgeted, calibration), abs=0.01)
    original = dict(dit_program.denoiser.named_parameters())
    for b, block in enumerate(budgeted.denoiser.transformer_blocks):
        assert isinstance(block.attn1.processor, LinearAttention) == (b in replaced)
        if b not in replaced:  # the original attention, bit for bit
            for name, value in block.named_parameters():
                assert torch.equal(value, original[f"transformer_blocks.{b}.{name}"]), name
    assert f"blocks {reverted} reverted to softmax, most sensitive first" in notes_md(budgeted)
    with pytest.raises(ConfigError, match="lower the budget or distill longer"):
        linearize(dit_program, calibration, fraction=0.75, steps=0, min_calibration_psnr_db=199.0)


def notes_md(program):
    return "\n".join(program.decision("linearize").markdown())


def test_local_attention_with_a_halo_over_the_whole_grid_saves_no_flops(dit_program, calibration):
    local = linearize(dit_program, calibration, kind="local", radius=2.0, tile=4, selection="all", steps=0)
    processors = [b.attn1.processor for b in local.denoiser.transformer_blocks]
    assert all(isinstance(p, LocalAttention) and p.keys_per_query == 64 for p in processors)  # (4 + 4)^2 of 64
    # At 64 tokens a 4x4 tile's halo already holds every token: no FLOPs saved (the sweep shows where it pays).
    assert plan_flops(local)["per_image"] >= plan_flops(dit_program)["per_image"]


def test_bad_configs_are_refused(unet_program):
    with pytest.raises(ConfigError, match="kind in"):
        plan_passes([{"pass": "linearize", "config": {"kind": "sparse"}}], frozenset({"fp32"}))
    with pytest.raises(ConfigError, match="min_calibration_psnr_db in"):
        plan_passes([{"pass": "linearize", "config": {"min_calibration_psnr_db": -1}}], frozenset({"fp32"}))
    with pytest.raises(ConfigError, match="not a unet"):
        plan_passes([{"pass": "linearize"}], frozenset({"fp32"}), program=unet_program)
