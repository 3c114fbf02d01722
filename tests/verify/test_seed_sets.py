"""verify.seed_sets: a distribution gate is decided on disjoint seed sets drawn one at a time, at least two (the
fewest that measure the seed noise), more while the bound lies inside the mean shift's 95% interval."""

import math
import statistics

import pytest

from verify import seed_sets


def test_one_set_never_decides_and_a_diverged_candidate_decides_at_once():
    assert seed_sets.undecided([0.0], 0.03)  # no noise measured yet, however far from the bound
    assert seed_sets.undecided([1.0], 0.03)
    assert not seed_sets.undecided([0.0], 0.03, min_sets=1)  # a run allowed one set
    assert not seed_sets.undecided([math.inf], 0.03) and not seed_sets.undecided([0.01, math.nan], 0.03)


def test_a_bound_inside_the_mean_shifts_95_percent_interval_draws_another_set():
    # Two sets that agree closely have 1 degree of freedom: t = 12.71 standard errors, not 2.
    assert seed_sets.half_width([0.009, 0.011]) == pytest.approx(12.706 * 0.001, rel=1e-4)
    assert not seed_sets.undecided([0.009, 0.011], 0.03)  # 0.02 below the bound, +- 0.0127
    assert not seed_sets.undecided([0.049, 0.051], 0.03)  # as far above it: decided, a failure
    # sd-digits' 4-step student (cpu-steps) on its first evaluation sets (BENCHMARKS.md): its first two agree
    # (0.0247, 0.026), which a 2-standard-error rule would have called a pass; the interval keeps it open.
    spread = [0.0247, 0.026, 0.0373, 0.0308]
    assert [seed_sets.undecided(spread[:k], 0.03) for k in range(2, 5)] == [True, True, True]
    mean, error = seed_sets.mean_and_error(spread)
    assert mean == pytest.approx(0.0297) and error == pytest.approx(statistics.stdev(spread) / 2)
    assert seed_sets.half_width(spread) == pytest.approx(3.182 * error, rel=1e-3)


def summary(shift, fd=1.0, floor=0.5, psnr=30.0):
    terms = {"shift_mean": shift / 2, "shift_cov": shift / 2, "candidate": fd, "floor": floor, "paired": 2 * fd}
    return {"fd_self_shift": shift, **{f"fd_self_{k}": v for k, v in terms.items()}, "psnr_db_mean": psnr}


def test_pooling_averages_the_distribution_metrics_and_keeps_the_first_sets_paired_ones():
    pooled = seed_sets.pool([summary(0.01, 1.0, 0.5, 30.0), summary(0.03, 2.0, 1.5, 20.0)], ["fd_self"])
    assert pooled["fd_self_shift"] == pytest.approx(0.02) and pooled["fd_self_shift_sets"] == [0.01, 0.03]
    assert pooled["fd_self_shift_se"] == pytest.approx(0.01)  # sd 0.01414 / sqrt(2)
    assert pooled["fd_self_shift_ci"] == pytest.approx(0.12706, rel=1e-4)
    assert pooled["fd_self_shift_mean"] + pooled["fd_self_shift_cov"] == pytest.approx(pooled["fd_self_shift"])
    assert pooled["fd_self_candidate"] == 1.5 and pooled["fd_self_floor"] == 1.0 and pooled["fd_self_ratio"] == 1.5
    assert pooled["fd_self_paired"] == 3.0
    assert pooled["psnr_db_mean"] == 30.0 and pooled["seed_sets"] == 2
    # A metric some set lacks is left as the first set gave it; a diverged set makes the mean infinite.
    assert "fd_digits_shift_sets" not in seed_sets.pool([summary(0.01)], ["fd_digits"])
    diverged = seed_sets.pool([summary(0.01), summary(math.inf)], ["fd_self"])
    assert diverged["fd_self_shift"] == math.inf and diverged["fd_self_shift_se"] is None


def draws(monkeypatch, first, more, max_sets, bounds=(("fd_self", 0.03),)):
    """The sets verification draws after `first` (shifts of the further sets: `more`), and the pooled result."""
    from optimizer import tasks
    from optimizer.options import JobOptions

    drawn, shifts = [], iter(more)

    def judge_seed_set(program, runner, opts, progress, judges, k):
        drawn.append(k)
        return summary(next(shifts))

    monkeypatch.setattr(tasks, "judge_seed_set", judge_seed_set)
    pooled = tasks.more_seed_sets(None, None, JobOptions(seed_sets=max_sets), None, None, summary(first), dict(bounds))
    return drawn, pooled


def test_verification_draws_sets_while_a_distribution_gate_is_within_its_noise(monkeypatch):
    drawn, pooled = draws(monkeypatch, 0.029, [0.031, 0.028, 0.032], 4)  # at the bound: every set allowed
    assert drawn == [1, 2, 3] and pooled["seed_sets"] == 4 and pooled["seed_sets_within_noise"] == ["fd_self"]
    assert pooled["fd_self_shift_sets"] == [0.029, 0.031, 0.028, 0.032]
    drawn, pooled = draws(monkeypatch, 0.001, [0.0012], 4)  # far below it (+- 0.0013): the second set decides
    assert drawn == [1] and pooled["seed_sets"] == 2 and pooled["seed_sets_within_noise"] == []
    drawn, pooled = draws(monkeypatch, 0.001, [], 1)  # --seed-sets 1: one set, its noise not measured
    assert drawn == [] and pooled["seed_sets"] == 1 and pooled["fd_self_shift_se"] is None
    drawn, _ = draws(monkeypatch, 0.001, [], 4, bounds=())  # no distribution gate: nothing more to decide
    assert drawn == []
