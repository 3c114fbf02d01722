"""Lost modes in a policy's action chunks. A policy's chunk distribution for one observation is often
multimodal (around the T-block one way or the other); a candidate that keeps the average behaviour but
collapses the modes can still pass paired and feature-distribution checks taken over many observations.
For a fixed set of observations, DRAWS chunks each from the original (two noise draws: the reference and
the floor) and from the candidate, compared per observation with improved precision and recall (Kynkäänniemi
et al. 2019): recall is the fraction of the original's chunks inside the candidate's k-nearest-neighbour
manifold (the union of balls around each candidate chunk reaching its k-th nearest candidate neighbour), so
a collapsed candidate covers fewer of them; precision, the candidate's chunks inside the original's
manifold (invented modes). The original's second draw gives the floor, what a faithful candidate reaches
with as many samples; the gated metric is the recall's drop below it."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from core.environments import programs
from core.ir import DiffusionProgram
from verify.judges.base import DISTRIBUTION, Evaluate, Judge, JudgeOptions, Metric, Outputs

OBSERVATIONS = 32  # the first rows of the policy's observation set
DRAWS = 16  # chunks per observation and policy
NEIGHBOUR = 3  # k of the k-NN radius (Kynkäänniemi et al. use 3)
REFERENCE_SEED, FLOOR_SEED = 600_000, 700_000


class ActionModesJudge(Judge):
    name = "action-modes"
    applies_to = "policies (action chunks conditioned on observations)"
    metrics: ClassVar = (
        Metric("mode_recall", DISTRIBUTION, "policies: the original's chunks inside the candidate's k-NN manifold"),
        Metric("mode_recall_floor", DISTRIBUTION, "policies: the same for a second draw of the original"),
        Metric(
            "mode_recall_drop",
            DISTRIBUTION,
            "policies: the floor's recall minus the candidate's (lost modes per observation; 0: none lost)",
        ),
        Metric("mode_precision", DISTRIBUTION, "policies: the candidate's chunks inside the original's manifold"),
        Metric("mode_precision_floor", DISTRIBUTION, "policies: the same for a second draw of the original"),
    )

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        return self.metric_keys() if program.spec.chunking is not None else frozenset()

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        observed = _observations(program)
        original: list[np.ndarray] = []  # drawn once, when a candidate is first judged

        def evaluate(candidate: Outputs) -> dict[str, Any]:
            if candidate.policy is None:  # a further seed set: nothing to draw from here
                return {}
            if not original:
                seeds = (REFERENCE_SEED, FLOOR_SEED)
                original.extend(_draw(programs.torch_policy(program, s), observed) for s in seeds)
            return compare(original[0], original[1], _draw(candidate.policy, observed))

        return evaluate


def _observations(program: DiffusionProgram) -> dict[str, np.ndarray]:
    """OBSERVATIONS rows of the observation set, each repeated DRAWS times ([OBSERVATIONS * DRAWS, ...])."""
    rows = {k: v[:OBSERVATIONS].numpy() for k, v in program.stages.observations.items()}
    return {k: np.repeat(v, DRAWS, axis=0) for k, v in rows.items()}


def _draw(policy: Any, observed: dict[str, np.ndarray]) -> np.ndarray:
    """Each observation's DRAWS chunks ([observations, DRAWS, horizon * action_dim]), an episode's first decision
    (a warm-starting policy runs its whole loop there)."""
    n = len(next(iter(observed.values())))
    chunks = np.asarray(policy(0, np.arange(n), observed), dtype=np.float64)
    return chunks.reshape(n // DRAWS, DRAWS, -1)


def coverage(real: np.ndarray, fake: np.ndarray, k: int = NEIGHBOUR) -> float:
    """The fraction of `real` ([N, D]) inside `fake`'s k-NN manifold: within the distance of some fake point to
    its own k-th nearest fake neighbour (improved recall when `real` is the original; precision, swapped)."""
    inner = torch.cdist(torch.from_numpy(fake), torch.from_numpy(fake))
    radius = inner.kthvalue(k + 1, dim=1).values  # the 0th is the point itself
    across = torch.cdist(torch.from_numpy(real), torch.from_numpy(fake))
    return float((across <= radius[None]).any(dim=1).double().mean())


def compare(reference: np.ndarray, floor: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Recall and precision per observation, averaged, for the candidate and for the original's second draw."""
    per = lambda f, a, b: float(np.mean([f(x, y) for x, y in zip(a, b, strict=True)]))  # noqa: E731
    recall, recall_floor = per(coverage, reference, candidate), per(coverage, reference, floor)
    return {
        "mode_recall": recall,
        "mode_recall_floor": recall_floor,
        "mode_recall_drop": recall_floor - recall,
        "mode_precision": per(coverage, candidate, reference),
        "mode_precision_floor": per(coverage, floor, reference),
    }


JUDGE = ActionModesJudge()
