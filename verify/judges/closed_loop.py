"""Closed-loop success of a policy in its environment (core.environments): the original and the candidate each
run the same episodes (initial states from fixed seeds, the same noise seeds per decision), and the gate
compares the candidate's success rate with the original's 95% beta-posterior interval (as LeRobot reports its
evaluations), not with pixels. Applies to policies loaded with (or given, --env) an environment."""

from __future__ import annotations

from typing import Any, ClassVar

from core.environments import programs, rollout
from core.ir import DiffusionProgram
from verify.judges.base import ADHERENCE, Evaluate, Judge, JudgeOptions, Metric, Outputs

EPISODE_SEED = 400_000  # initial states of the judged episodes (disjoint from the observation set's)
PROXY_EPISODE_SEED = 450_000  # the search's proxy episodes (disjoint from the judged ones: at most 10,000)
NOISE_SEED = 500_000  # the policies' noise: decision i of episode j draws NOISE_SEED + i * STRIDE + j


class ClosedLoopJudge(Judge):
    name = "closed-loop"
    applies_to = "policies with an environment (--env), closed loop"
    metrics: ClassVar = (
        Metric("success_rate", ADHERENCE, "the candidate's success rate over the episodes"),
        Metric("success_rate_reference", ADHERENCE, "the original's success rate on the same episodes"),
        Metric(
            "success_shortfall",
            ADHERENCE,
            "how far the candidate's success rate lies below the low end of the original's 95% beta-posterior"
            " interval (0: inside it or above)",
        ),
        Metric("mean_max_coverage", ADHERENCE, "the candidate's mean best goal coverage per episode"),
        Metric("coverage_drop", ADHERENCE, "the original's mean best coverage minus the candidate's"),
    )

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        policy = program.spec.chunking is not None
        return self.metric_keys() if policy and (options.environment or program.stages.environment) else frozenset()

    def why_not(self, program: DiffusionProgram, options: JudgeOptions) -> str:
        if program.spec.chunking is None:
            return "applies to policies (action chunks conditioned on observations)"
        return "the policy names no environment (--env)"

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        chunking = program.spec.chunking
        assert chunking is not None
        first = EPISODE_SEED if options.episode_seed is None else options.episode_seed
        seeds = list(range(first, first + options.episodes))
        env = options.environment or program.stages.environment
        assert env is not None, "provides() applies the judge only to a policy with an environment"
        originals: list[rollout.Episodes] = []  # run once, when a candidate is first judged

        def evaluate(candidate: Outputs) -> dict[str, Any]:
            if candidate.policy is None:  # nothing runs closed loop (a further seed set): nothing measured here
                return {}
            if not originals:
                policy = programs.torch_policy(program, NOISE_SEED)
                originals.append(
                    rollout.run(env, policy, seeds, chunking, desc=f"closed loop: original, {len(seeds)} episodes")
                )
            desc = f"closed loop: candidate, {len(seeds)} episodes"
            return compare(originals[0], rollout.run(env, candidate.policy, seeds, chunking, desc=desc))

        return evaluate


def compare(original: rollout.Episodes, candidate: rollout.Episodes) -> dict[str, Any]:
    """The closed-loop metrics of a candidate's episodes against the original's (the same seeds)."""
    low, high = original.interval()
    seeds = candidate.seeds
    return {
        "episodes": len(seeds),
        "episode_seeds": f"{seeds[0]}..{seeds[-1]}",
        "success_rate": candidate.success_rate,
        "success_interval": list(candidate.interval()),
        "success_rate_reference": original.success_rate,
        "success_interval_reference": [low, high],
        "success_shortfall": max(0.0, low - candidate.success_rate),
        "mean_max_coverage": float(candidate.max_coverage.mean()),
        "coverage_drop": float(original.max_coverage.mean() - candidate.max_coverage.mean()),
        "policy_calls": candidate.calls,
    }


JUDGE = ClosedLoopJudge()
