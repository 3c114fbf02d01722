"""Every seed family a run draws from, in one place, so the sets never overlap: verification's
evaluation seeds, calibration, the distillation passes' teacher samples, the search's proxies, each
offset by the run's --seed (MAX_FAMILY seeds each), and the judges' floor sets and fresh draws above them.

torch's CPU generators read only the low 32 bits of a seed (seeds 2**32 apart draw the same noise), so
every family lies below 2**32."""

from __future__ import annotations

MAX_FAMILY = 10_000  # seeds per family (--samples and the like are capped at it)

EVALUATION = 0
CALIBRATION = 10_000
TEACHER = 20_000  # recover / linearize: fresh trajectories of the reference (calibration.distill_data)
GUIDANCE_DISTILL = 30_000  # the teacher's samples of guidance distillation
PROGRESSIVE_DISTILL = 40_000  # ... and of progressive distillation
PROXY = 50_000  # the search's proxy seeds
DISTRIBUTION_CHECK = 60_000  # the loop-changing passes' distribution check (verify.floor_check)
CONSISTENCY_DISTILL = 70_000  # the teacher's samples of consistency distillation
LAST_FAMILY_END = CONSISTENCY_DISTILL + MAX_FAMILY

FLOOR = 1 << 30  # a set's floor set: FLOOR + each of its seeds (verify.verdict)
NULL = 1 << 31  # fresh draws of the original judged as candidates (bench): NULL + draw * NULL_STRIDE + i
NULL_STRIDE = 1 << 20

MAX_SEED = FLOOR - LAST_FAMILY_END  # --seed: every family it offsets stays below the floor sets


def family(base: int, seed: int, n: int) -> list[int]:
    """`n` seeds of the family at `base` for a run with --seed `seed`."""
    if not 0 <= n <= MAX_FAMILY:
        raise ValueError(f"a seed family holds at most {MAX_FAMILY} seeds, asked for {n}")
    return list(range(base + seed, base + seed + n))
