"""A candidate's final samples judged against the original's: the reference (the original on the same
seeds and conditions) and the floor set (the original on disjoint seeds, same conditions), by every judge
that applies to the model. For a latent pipeline the judges read decoded images: the original's VAE
decodes the reference and floor sets, and a candidate's (unless its own decoder's images are given)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core import seeds
from core.conditions import encode
from core.ir import DiffusionProgram
from core.sampling import sample
from core.stages import decode
from core.variants import torch_loop
from verify.judges import JudgeOptions, JudgePlan, Outputs, plan_judges

FLOOR_OFFSET = seeds.FLOOR  # the floor set's seed for evaluation seed s is s + FLOOR_OFFSET (core.seeds)


def floor_seeds(seeds: Sequence[int]) -> list[int]:
    return [FLOOR_OFFSET + s for s in seeds]


def null_seeds(draw: int, n: int) -> list[int]:
    """Seeds of the `draw`-th fresh draw of the original: disjoint from every other set and draw."""
    start = seeds.NULL + draw * seeds.NULL_STRIDE
    return list(range(start, start + n))


def floor_cell(row: dict[str, Any], prefix: str) -> str:
    """A distribution metric for a table: the shift (the gated value), with the ratio of the candidate's FD
    to the floor's and both."""
    shift = row.get(f"{prefix}_shift")
    if shift is None:
        return "n/a"
    fd, floor = row[f"{prefix}_candidate"], row[f"{prefix}_floor"]
    return f"{shift:.3g} ({row[f'{prefix}_ratio']:.2f}: {fd:.3g} / {floor:.3g})"


def outputs(
    program: DiffusionProgram, final: torch.Tensor, conditions: Sequence[Any] | None, images: torch.Tensor | None = None
) -> Outputs:
    """A set of finals as judges read it: decoded by the pipeline's VAE (or `images`, already decoded)."""
    conditions = None if conditions is None else tuple(conditions)
    if program.stages.vae is not None:
        return Outputs(final, decode(program.stages, final) if images is None else images, conditions, decoded=True)
    return Outputs(final, final if final.dim() in (4, 5) else None, conditions)


class Verdict:
    def __init__(
        self,
        program: DiffusionProgram,
        reference: Any,
        floor_final: torch.Tensor,
        options: JudgeOptions | None = None,
        plan: JudgePlan | None = None,
    ) -> None:
        """`reference`: the original's trajectories (calibration.capture.Trajectories) on the evaluation
        seeds; `floor_final`: the original's finals on their floor seeds (see `sample_floor`); `plan`: the
        judges that apply (default: planned here from `options`)."""
        self.program, self.reference = program, reference
        self.plan = plan or plan_judges(program, options or JudgeOptions())
        self.reference_outputs = outputs(program, reference.final, reference.conditions)
        floor = outputs(program, floor_final, reference.conditions)
        self.evaluators = [
            j.prepare(program, self.plan.options, self.reference_outputs, floor) for j in self.plan.active
        ]

    @classmethod
    def for_program(
        cls, program: DiffusionProgram, reference: Any, options: JudgeOptions | None = None, progress: Any = None
    ) -> Verdict:
        """The verdict with the floor set sampled here (the original, in torch)."""
        return cls(program, reference, sample_floor(program, reference, progress), options)

    def __call__(
        self,
        final: torch.Tensor,
        errors: Sequence[float] | None = None,
        timesteps: Sequence[float] | None = None,
        images: torch.Tensor | None = None,
        policy: Any = None,
    ) -> dict[str, Any]:
        """Every applicable judge's metrics of a candidate's finals (`images`: decoded by the artifact's
        own decoder); `errors`: its per-step errors at `timesteps` (default: the reference's); `policy`: a
        policy candidate in closed-loop form (core.environments.programs)."""
        reference = self.reference
        candidate = outputs(self.program, final, reference.conditions, images)
        steps = [float(t) for t in (reference.t if timesteps is None else timesteps)]
        candidate = Outputs(
            candidate.samples, candidate.images, candidate.conditions, candidate.decoded, errors, steps, policy
        )
        summary: dict[str, Any] = {
            "samples": len(reference.seeds),
            "floor_seeds": f"{FLOOR_OFFSET + reference.seeds[0]}..{FLOOR_OFFSET + reference.seeds[-1]}",
            "judges": [j.name for j in self.plan.active],
        }
        for evaluate in self.evaluators:
            summary.update(evaluate(candidate))
        return summary

    @property
    def reference_images(self) -> torch.Tensor | None:
        return self.reference_outputs.images


@dataclass(frozen=True)
class FinalSet:
    """The original's finals on one evaluation set, as a Verdict reads its reference (no trajectories)."""

    final: torch.Tensor
    seeds: tuple[int, ...]
    conditions: tuple | None
    t: torch.Tensor


def sample_reference(
    program: DiffusionProgram, seeds: Sequence[int], conditions: Any, progress: Any = None
) -> FinalSet:
    """The original's finals (torch) on `seeds` with `conditions`: a further evaluation set's reference, or a
    floor set."""
    batch = encode(program, conditions, len(seeds))
    kwargs = {} if progress is None else {"progress": progress}
    final = sample(program.plan, program.spec.sample_shape, torch_loop(program), list(seeds), batch, **kwargs)
    return FinalSet(final, tuple(seeds), None if conditions is None else tuple(conditions), torch.empty(0))


def sample_floor(program: DiffusionProgram, reference: Any, progress: Any = None) -> torch.Tensor:
    """The original's finals on the floor seeds of `reference`'s seeds, with its conditions."""
    return sample_reference(program, floor_seeds(reference.seeds), reference.conditions, progress).final
