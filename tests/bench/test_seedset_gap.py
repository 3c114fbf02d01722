"""bench.seedset_gap: an artifact judged on a search's proxy seeds as a trial is. The original, lowered as it
is, sits at the original's own distribution there (tiny random DiT: mechanics, not fidelity)."""

import pytest
from helpers import lower

from bench.seedset_gap import METRICS, judge_on_proxy_seeds


def test_the_lowered_original_measures_no_shift_on_the_proxy_seeds(tiny_digits_dit, tiny_digits_program, tmp_path):
    artifact = tmp_path / "artifact"
    lower(tiny_digits_program, artifact)
    (row,) = judge_on_proxy_seeds(tiny_digits_dit, [artifact], samples=8).values()
    assert set(row) == set(METRICS)
    assert row["fd_self_shift"] == pytest.approx(0.0, abs=1e-6) and row["psnr_db_mean"] > 60


def test_the_spread_judges_each_artifact_on_disjoint_seed_sets(tiny_digits_dit, tiny_digits_program, tmp_path):
    from bench.seedset_gap import SPREAD, spread

    artifact = tmp_path / "artifact"
    lower(tiny_digits_program, artifact)
    (row,) = spread(tiny_digits_dit, [artifact], sets=2, samples=8).values()
    assert set(row) == set(SPREAD)  # a digits model: both distribution gates' metrics
    for metric in SPREAD:  # the original, lowered as it is, sits at its own distribution on every set
        assert len(row[metric]["per_set"]) == 2 and max(map(abs, row[metric]["per_set"])) < 1e-6
