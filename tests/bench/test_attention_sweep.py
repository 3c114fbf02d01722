"""The attention sweep on a tiny geometry: softmax and linear attention lowered and timed, layer and block;
FLOPs counted (the sweep's numbers at 256-4096 tokens are in BENCHMARKS.md)."""

import pytest
from click.testing import CliRunner

from bench.attention_sweep import check_memory, markdown, sweep
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
    check_memory((16, 64), heads=12, available=24 * 2**30)  # 4096 tokens: about 9 GiB
    with pytest.raises(ConfigError, match="16384 tokens with 12 heads need about 144 GiB"):
        check_memory((16, 128), heads=12, available=24 * 2**30)
    result = CliRunner().invoke(main, ["attention-sweep", "--tokens", "128", "--heads", "64"])
    assert result.exit_code == 2 and "use smaller --tokens or fewer --heads" in result.output
