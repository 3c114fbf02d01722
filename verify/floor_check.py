"""The distribution check a loop-changing pass runs on its own seeds before it commits to a saving: the
verification's denoiser-feature gate (verify.judges.denoiser_features) in small. The original program
samples a reference set and a floor set (disjoint seeds, same conditions); a candidate is sampled on the
reference's seeds, and its distribution shift is measured as the verification's gate measures it
(verify.metrics.distribution_shift: about 0 for a candidate within the original's seed-to-seed noise). A
per-seed PSNR cannot see this: a cached or distilled loop can stay close to the original on every seed
while all of its samples drift the same way."""

from __future__ import annotations

from collections.abc import Callable

import torch

from core import seeds
from core.conditions import condition_set
from core.ir import DiffusionProgram
from core.variants import sample_program
from verify.judges.base import FloorFD
from verify.judges.denoiser_features import PREFIX, DenoiserFeatures
from verify.verdict import floor_seeds

SAMPLES = 100  # as many as the verification's default set: the shift's seed-to-seed noise is the gate's


class FloorCheck:
    def __init__(
        self, original: DiffusionProgram, samples: int = SAMPLES, seed: int = 0, progress: Callable = lambda it, **_: it
    ) -> None:
        self.seeds = seeds.family(seeds.DISTRIBUTION_CHECK, seed, samples)
        self.conditions = condition_set(original.spec.conditioning, original.stages, samples)
        self.features = DenoiserFeatures(original)
        self.progress = progress
        reference = self._sample(original, self.seeds, "the original")
        floor = self._sample(original, floor_seeds(self.seeds), "its floor set")
        self.fd = FloorFD(PREFIX, self.features(reference, self.conditions), self.features(floor, self.conditions))

    @property
    def floor(self) -> float:
        return self.fd.floor_fd

    def shift(self, candidate: DiffusionProgram) -> float:
        """The candidate's distribution shift (inf for a diverged candidate)."""
        final = self._sample(candidate, self.seeds, "a candidate")
        return self.fd(self.features(final, self.conditions))[f"{PREFIX}_shift"]

    def _sample(self, program: DiffusionProgram, seeds: list[int], what: str) -> torch.Tensor:
        desc = f"distribution check: {what}, {len(seeds)} samples"
        return sample_program(program, seeds, self.conditions, progress=lambda it: self.progress(it, desc=desc))
