"""The attention sweep on a tiny geometry: softmax and linear attention lowered and timed, layer and block;
FLOPs counted (the sweep's numbers at 256-4096 tokens are in BENCHMARKS.md)."""

import pytest
from click.testing import CliRunner

from bench.attention_sweep import check_memory, markdown, memory_needed, sweep
from core.errors import ConfigError
from optimizer.cli import main


def test_the_sweep_times_the_layer_and_the_block_of_each_variant():
    only = ("linear (relu)", "local r=1 (CLEAR)")
    (row,) = sweep(sides=(8,), heads=2, head_dim=8, radii=(1.0, 2.0), tile=2, repeats=1, log=lambda _: None, only=only)
    assert row["tokens"] == 64 and list(row["variants"]) == ["softmax", *only]
    assert row["variants"]["local r=1 (CLEAR)"]["keys_per_query"] == 16  # a 2x2 tile's (2 + 2)^2 halo
    softmax = row["variants"]["softmax"]
    assert softmax["attention_speedup"] == softmax["block_speedup"] == 1.0
    for variant in row["variants"].values():
        assert variant["attention_ms"] > 0 and variant["block_ms"] > 0 and variant["attention_gflops_per_image"] > 0
    assert row["variants"]["linear (relu)"]["attention_gflops_per_image"] < softmax["attention_gflops_per_image"]
    text = markdown([row])
    assert "The attention layer alone" in text and "| 64 |" in text and "(16 keys)" in text


def test_a_sweep_that_cannot_fit_in_memory_is_refused_before_any_work():
    gib = 2**30
    default = {"heads": 12, "head_dim": 64, "radii": (4.0, 8.0, 16.0), "tile": 8}
    assert 8 * gib < memory_needed(64, **default) < 12 * gib  # measured: about 10 GB at 4096 tokens
    check_memory((16, 64), **default, available=24 * gib)
    with pytest.raises(ConfigError, match="16384 tokens with 12 heads and local radii 4, 8, 16 need about"):
        check_memory((16, 128), **default, available=24 * gib)
    # A wide window costs more than softmax: 4096 tokens, radius 64 -> (8 + 2 * 56)^2 keys per query.
    with pytest.raises(ConfigError, match="4096 tokens"):
        check_memory((64,), **{**default, "radii": (64.0,)}, available=24 * gib)
    result = CliRunner().invoke(main, ["attention-sweep", "--tokens", "128", "--heads", "64"])
    assert result.exit_code == 2 and "use smaller --tokens, --radius or fewer --heads" in result.output
