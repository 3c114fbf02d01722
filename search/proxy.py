"""Cheap proxies for a search trial, all against the original: the target's gates measured on a small
seed set of its own (disjoint from the calibration and verification seeds), as constraints.

Paired PSNR and the judges' metrics (distribution against a floor set of the proxies' own, adherence)
come from the same `verify.verdict.Verdict` the final verification uses; the teacher-forced error from the
pass manager's quick fidelity (on the calibration trajectories). A policy runs closed loop (in torch) on
episodes of the proxies' own (PROXY_EPISODE_SEED), as many as the closed-loop judge runs (--episodes), the
original once: the success gate's interval narrows with the episodes, and at half of them it let candidates
through that the judge's episodes then failed (BENCHMARKS.md). A gate whose metric a candidate lacks (the
teacher-forced error of a distilled student) was not measured: the candidate is infeasible for it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from calibration.capture import capture, evaluation_set
from core import seeds
from core.conditions import encode
from core.environments.programs import torch_policy
from core.ir import DiffusionProgram
from core.sampling import sample
from core.variants import torch_loop
from verify.gates import GATES
from verify.judges import JudgeOptions, JudgePlan, plan_judges
from verify.judges.closed_loop import NOISE_SEED, PROXY_EPISODE_SEED
from verify.verdict import Verdict, sample_floor

PROXY_SEED = seeds.PROXY  # + the run's --seed; disjoint from every other family (core.seeds)


class ProxySet:
    def __init__(self, program: DiffusionProgram, samples: int, seed: int = 0, plan: JudgePlan | None = None) -> None:
        self.seeds, self.conditions = evaluation_set(program, samples, PROXY_SEED + seed)
        self.reference = capture(program, self.seeds, self.conditions)
        self.policy = program.spec.chunking is not None
        if self.policy:  # closed loop on episodes of the proxies' own, as many as the judge runs
            options = plan.options if plan is not None else JudgeOptions()
            plan = plan_judges(program, dataclasses.replace(options, episode_seed=PROXY_EPISODE_SEED))
        self.verdict = Verdict(program, self.reference, sample_floor(program, self.reference), plan=plan)

    def measure(self, candidate: DiffusionProgram) -> dict[str, Any]:
        """The candidate's loop (torch) on the proxy seeds, judged against the original's samples."""
        batch = encode(candidate, self.conditions, len(self.seeds))
        loop = torch_loop(candidate)
        final = sample(candidate.plan, candidate.spec.sample_shape, loop, self.seeds, batch)
        policy = torch_policy(candidate, NOISE_SEED, loop) if self.policy else None
        summary = self.verdict(final, [float("nan")], policy=policy)
        return {k: v for k, v in summary.items() if not isinstance(v, list) and not k.startswith("eps_")}


def constraints(metrics: dict[str, Any], gates: dict[str, float]) -> dict[str, float]:
    """Per gate, how far the measured value is past its bound, relative to the bound's scale: <= 0 is
    feasible (Optuna's constraint convention). A metric that is missing or None was not measured, and a
    NaN or infinite one diverged: either is infeasible."""
    values = {}
    for name, bound in sorted(gates.items()):
        gate = GATES[name]
        value = metrics.get(gate.metric)
        if value is None or not math.isfinite(value):
            values[name] = 1.0
            continue
        excess = value - bound if gate.kind == "max" else bound - value
        values[name] = excess / max(abs(bound), 1e-3)
    return values
