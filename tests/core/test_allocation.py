"""core.allocation: one option per item, cheapest within an additive budget (scipy milp), checked against
brute force on small random problems."""

import itertools
import random

import pytest

from core.allocation import cheapest_within


def brute_force(costs, risks, budget):
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        if sum(r[j] for r, j in zip(risks, picks, strict=True)) <= budget + 1e-12:
            cost = sum(c[j] for c, j in zip(costs, picks, strict=True))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_the_integer_program_finds_the_cheapest_choice_within_budget(seed):
    rng = random.Random(seed)
    costs, risks = [], []
    for _ in range(6):  # layers: [4-bit, 8-bit, fp32] bits and their measured error increases
        size = rng.randint(1, 9) * 1000
        costs.append([4 * size, 8 * size, 32 * size])
        worst = rng.random()
        risks.append([worst, worst * rng.random() * 0.5, 0.0])
    budget = rng.random() * sum(r[0] for r in risks) * 0.5
    picks = cheapest_within(costs, risks, budget)
    assert sum(r[j] for r, j in zip(risks, picks, strict=True)) <= budget + 1e-9
    assert sum(c[j] for c, j in zip(costs, picks, strict=True)) == brute_force(costs, risks, budget)


def test_generous_and_zero_budgets():
    costs, risks = [[4, 8, 32], [4, 32]], [[0.1, 0.05, 0.0], [0.2, 0.0]]
    assert cheapest_within(costs, risks, 1.0) == [0, 0]
    assert cheapest_within(costs, risks, 0.0) == [2, 1]
    assert cheapest_within(costs, risks, 0.06) == [1, 1]
    with pytest.raises(ValueError, match="zero risk"):
        cheapest_within([[4]], [[0.1]], 1.0)
