"""The analyses passes read, computed on demand and cached (LLVM's new pass manager: an analysis is
keyed by what it depends on, kept while no pass invalidates it, recomputed when one does).

- calibration: the reference network's trajectories on the calibration seeds under the current loop,
  keyed by the reference's fingerprint; a pass that changes the loop (sampler) declares it invalidates
  calibration, the manager re-plans the reference and the next read recaptures.
- flops: denoiser FLOPs per image, keyed by the program's fingerprint (weights, plan and every applied
  pass with its config); carried over to a pass's output unless the pass declares it invalidates FLOPs.
- distribution check: the original's reference and floor sets of verify.floor_check (sampled once per
  original, sample count and seed; a recipe's loop-changing passes and its alternatives share them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from calibration.capture import Trajectories
from core.errors import ConfigError
from core.flops import plan_flops
from core.ir import DiffusionProgram
from verify.floor_check import FloorCheck

# Analyses: facts about a program that passes read and the manager caches.
CALIBRATION = "calibration"  # the reference network's trajectories under the current loop
FLOPS = "flops"  # denoiser FLOPs per image (core.flops.plan_flops)
ANALYSES = (CALIBRATION, FLOPS)

Capture = Callable[[DiffusionProgram], Trajectories]


class Analyses:
    def __init__(self, capture: Capture | None = None, log: Callable[[str], None] = lambda _: None) -> None:
        self._capture = capture
        self._log = log
        self._cache: dict[tuple[str, str], Any] = {}
        self.computed: dict[str, int] = {CALIBRATION: 0, FLOPS: 0}  # how often each was (re)computed

    def provide(self, kind: str, program: DiffusionProgram, value: Any) -> None:
        """Seed the cache, e.g. with the job's calibration or one read from --calibration."""
        self._cache[kind, program.fingerprint()] = value

    def calibration(self, reference: DiffusionProgram) -> Trajectories:
        key = (CALIBRATION, reference.fingerprint())
        if key not in self._cache:
            if self._capture is None:
                raise ConfigError(
                    "this recipe needs calibration trajectories for a changed loop, and none can be captured"
                )
            if any(kind == CALIBRATION for kind, _ in self._cache):
                self._log(f"recapturing calibration: the loop changed ({_loop(reference)})")
            self._cache[key] = self._capture(reference)
            self.computed[CALIBRATION] += 1
        return self._cache[key]

    def flops(self, program: DiffusionProgram) -> dict[str, Any]:
        key = (FLOPS, program.fingerprint())
        if key not in self._cache:
            self._cache[key] = plan_flops(program)
            self.computed[FLOPS] += 1
        return self._cache[key]

    def distribution_check(
        self, original: DiffusionProgram, samples: int, seed: int, progress: Callable[..., Any]
    ) -> FloorCheck:
        key = ("distribution", f"{original.fingerprint()}:{samples}:{seed}")
        if key not in self._cache:
            self._cache[key] = FloorCheck(original, samples, seed, progress)
        return self._cache[key]

    def carry_over(self, kind: str, before: DiffusionProgram, after: DiffusionProgram) -> None:
        """`after` has the same `kind` as `before` (its pass did not invalidate it)."""
        value = self._cache.get((kind, before.fingerprint()))
        if value is not None:
            self._cache.setdefault((kind, after.fingerprint()), value)


def _loop(program: DiffusionProgram) -> str:
    plan = program.plan
    return f"{plan.scheduler_class}, {plan.num_inference_steps} steps"
