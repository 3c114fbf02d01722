"""diffusers' cache hooks around our denoisers, and the matched-compute comparison with our cache pass."""

import pytest
import torch

from bench.cache_compare import compare_caching, markdown_table, matched
from bench.peer_caches import HookedDenoiser, PeerCache
from core.adapters import torch_denoise
from core.errors import ConfigError
from core.flops import count_flops
from core.variants import sample_program

SEEDS, LABELS = [0, 1], [3, 7]
# Settings under which each hook computes everything: the wrapped call must equal ours exactly.
NEUTRAL = {
    "first-block-cache": {"threshold": 0.0},
    "pyramid-attention-broadcast": {"spatial_attention_block_skip_range": 1},
    "faster-cache": {"spatial_attention_block_skip_range": 1, "unconditional_batch_skip_range": 1},
}


def one_by_one(program, denoise, reset=None):
    finals = []
    for seed, label in zip(SEEDS, LABELS, strict=True):
        if reset is not None:
            reset()
        finals.append(sample_program(program, [seed], [label], denoise))
    return torch.cat(finals)


@pytest.mark.parametrize(
    ("family", "method"),
    [
        ("dit", "first-block-cache"),
        ("dit", "pyramid-attention-broadcast"),
        ("dit", "faster-cache"),
        ("unet", "pyramid-attention-broadcast"),
        ("unet", "faster-cache"),
    ],
)
def test_a_hook_that_skips_nothing_reproduces_the_original_sampler(family, method, request):
    # FasterCache reads the batch as [uncond, cond] and ours is [cond, uncond]: the wrapper must swap.
    program = request.getfixturevalue(f"{family}_program")
    hooked = HookedDenoiser(program, PeerCache(method, NEUTRAL[method]))
    expected = one_by_one(program, torch_denoise(program))
    torch.testing.assert_close(one_by_one(program, hooked, hooked.reset), expected, rtol=0, atol=1e-5)


def test_a_skipping_hook_computes_less_and_changes_the_samples(dit_program):
    hooked = HookedDenoiser(dit_program, PeerCache("first-block-cache", {"threshold": 0.2}))
    out = {}
    original = count_flops(lambda: out.setdefault("original", one_by_one(dit_program, torch_denoise(dit_program))))
    cached = count_flops(lambda: out.setdefault("cached", one_by_one(dit_program, hooked, hooked.reset)))
    assert cached < 0.8 * original
    assert not torch.allclose(out["cached"], out["original"], atol=1e-3)


def test_hooks_that_do_not_apply_are_refused(unet_program):
    with pytest.raises(ConfigError, match="does not apply"):
        HookedDenoiser(unet_program, PeerCache("first-block-cache", {"threshold": 0.1}))
    with pytest.raises(ConfigError, match="unknown diffusers cache method"):
        HookedDenoiser(unet_program, PeerCache("teacache"))


def test_comparison_matches_our_budget_to_each_peer(dit_program):
    peers = (PeerCache("first-block-cache", {"threshold": 0.1}),)
    rows = compare_caching(
        dit_program,
        samples=4,
        calibration_samples=2,
        progress=lambda it, **_: it,
        log=lambda _: None,
        peers=peers,
        cache_config={"regions": [[0, 8]], "criterion": "uniform", "probe_samples": 2},
        timed_images=1,
        timing_rounds=1,
    )
    original, peer = rows[0], rows[1]
    assert original["kind"] == "original" and original["flops_fraction"] == pytest.approx(1.0)
    assert peer["kind"] == "peer" and peer["flops_fraction"] < 0.9
    ours = [r for r in rows if r["kind"].startswith("ours")]
    assert {r["kind"] for r in ours} == {"ours: guidance + cache", "ours: cache only"}
    for r in rows[2:]:  # never more compute than the budget it was searched at
        assert r["flops_fraction"] <= r["budget"] + 1e-9
    assert any(r["kind"] == "fewer steps" and r["name"] == "10 steps" for r in rows)  # the default 0.5 budget
    [(p, best, steps)] = matched(rows)
    assert p is peer and best is not None and steps is not None
    assert best["budget"] == steps["budget"] <= peer["flops_fraction"]
    assert best["calibration_psnr_db"] == max(r["calibration_psnr_db"] for r in ours if r["budget"] == best["budget"])
    table = markdown_table(rows)
    assert "first-block-cache (threshold=0.1)" in table and best["name"] in table
