"""verify.floor_check: the passes' distribution check is the verification's denoiser-feature shift in
small (random weights: mechanics only; how it orders real candidates is measured in BENCHMARKS.md)."""

import torch

from verify.floor_check import FloorCheck


def test_the_original_sits_exactly_at_its_own_floor_and_a_broken_candidate_far_above_it(dit_program):
    check = FloorCheck(dit_program, samples=16)
    assert check.floor > 0
    assert check.shift(dit_program) == 0.0  # its samples on the reference seeds are the reference set
    broken = dit_program.replace(denoiser=_scaled(dit_program.denoiser, 0.0))
    assert check.shift(broken) > 3.0
    diverged = dit_program.replace(denoiser=_scaled(dit_program.denoiser, float("nan")))
    assert check.shift(diverged) == float("inf")


def test_the_check_draws_seeds_disjoint_from_every_other_family(dit_program):
    from core import seeds

    check = FloorCheck(dit_program, samples=4, seed=3)
    assert check.seeds == [seeds.DISTRIBUTION_CHECK + 3 + i for i in range(4)]
    assert seeds.PROXY + seeds.MAX_FAMILY <= seeds.DISTRIBUTION_CHECK < seeds.LAST_FAMILY_END < seeds.FLOOR


def _scaled(denoiser, factor):
    import copy

    broken = copy.deepcopy(denoiser)
    with torch.no_grad():
        for p in broken.parameters():
            p.mul_(factor)
    return broken
