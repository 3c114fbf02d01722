"""The action-modes judge notices a candidate that collapses an observation's modes: two-mode chunks (the
original goes around an obstacle either way) against a candidate that always takes one way, and against a
faithful candidate (another draw of the same distribution)."""

import numpy as np

from verify.judges.action_modes import compare, coverage


def draws(rng, observations=32, n=16, dim=32, modes=(-1.0, 1.0)):
    """[observations, n, dim] chunks: each a mode (chosen at random) plus small noise."""
    way = rng.choice(modes, size=(observations, n, 1))
    return way * np.ones(dim) + rng.normal(0, 0.1, (observations, n, dim))


def test_a_collapsed_candidate_loses_recall_that_a_faithful_one_keeps():
    rng = np.random.default_rng(0)
    reference, floor, faithful = draws(rng), draws(rng), draws(rng)
    collapsed = draws(rng, modes=(1.0,))
    same = compare(reference, floor, faithful)
    lost = compare(reference, floor, collapsed)
    assert same["mode_recall_floor"] > 0.85 and abs(same["mode_recall_drop"]) < 0.1
    assert lost["mode_recall"] <= np.mean(reference[..., 0] > 0)  # it covers none of the other way
    assert lost["mode_recall_drop"] > 0.35
    assert lost["mode_precision"] >= same["mode_precision_floor"]  # what it does produce, the original does too


def test_coverage_counts_the_real_points_inside_the_fake_points_balls():
    fake = np.array([[0.0], [1.0], [2.0], [3.0]])  # each point's 3rd nearest neighbour: 3, 2, 2, 3 away
    real = np.array([[1.5], [5.9], [6.1], [-3.0]])
    assert coverage(real, fake) == 0.75  # 6.1 is beyond 3 + 3; -3.0 is exactly 0 + 3
