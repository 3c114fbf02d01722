"""Guidance policy: skip the unconditional pass where it no longer changes the step (Adaptive Guidance).

Adaptive Guidance (Castillo et al.) stops classifier-free guidance once it no longer pays: from then
on a step costs one network evaluation instead of two. The switch step is decided ahead of time on the
calibration set and stored in the SamplingPlan as a static per-step policy, so engines need no runtime
branching. Policies:

- `searched` (default): the earliest switch whose end-to-end samples on the calibration seeds stay
  within `min_psnr_db` of the original loop's (AG's search for a policy, scored end to end);
- `adaptive`: AG's similarity rule -- switch once the cosine similarity of the cond and uncond
  predictions (the `quantile` sample) stays above `threshold` for all remaining steps. On small
  pixel-space models the predictions are near-identical at high noise, so this rule can be misled;
- `early`: guidance on a fixed leading `fraction` of the steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram, SamplingPlan
from core.sampling import uses_guidance
from core.schedulers import model_calls
from passes.analyses import FLOPS
from passes.base import Context, Pass, PassResult, Phase
from verify.fidelity import replay_psnr

POLICIES = ("searched", "adaptive", "early")


@dataclass
class Config:
    policy: str = "searched"  # "searched", "adaptive" (similarity threshold) or "early" (leading fraction)
    min_psnr_db: float = 35.0  # searched: end-to-end PSNR vs the original loop on the calibration seeds
    threshold: float = 0.99  # adaptive: cosine similarity of cond and uncond predictions
    quantile: float = 0.1  # adaptive: the similarity of this quantile of the calibration samples must clear it
    fraction: float = 0.5  # early: fraction of the steps that keep guidance
    min_guided_steps: int = 1


@dataclass(frozen=True)
class GuidanceDecision(Decision):
    policy: str  # "none": the plan does not use guidance (see reason)
    reason: str = ""
    calibration_psnr_db_by_switch: dict[int, float] = field(default_factory=dict)
    guided_steps: int = 0
    unguided_steps: int = 0
    network_evaluations: int = 0
    network_evaluations_before: int = 0
    similarity_quantile_per_step: list[float] = field(default_factory=list)
    similarity_mean_per_step: list[float] = field(default_factory=list)

    title = "Guidance policy"

    def markdown(self) -> list[str]:
        if self.policy == "none":
            return [f"- unchanged: {self.reason}"]
        lines = [
            f"- policy `{self.policy}`: classifier-free guidance on the first {self.guided_steps} steps,"
            f" conditional pass only on the last {self.unguided_steps}"
            f" ({self.network_evaluations} network evaluations instead of {self.network_evaluations_before})"
        ]
        if self.calibration_psnr_db_by_switch:
            tried = ", ".join(f"{k}: {v}" for k, v in self.calibration_psnr_db_by_switch.items())
            lines.append(f"- end-to-end PSNR on the calibration seeds by guided-step count: {tried} dB")
        return lines


def check(config: Config, capabilities: frozenset[str]) -> None:
    if config.policy not in POLICIES:
        raise ConfigError(f"guidance: unknown policy '{config.policy}' (known: {', '.join(POLICIES)})")
    if not -1.0 <= config.threshold <= 1.0:
        raise ConfigError("guidance: threshold is a cosine similarity, in [-1, 1]")
    if not 0.0 <= config.quantile <= 1.0 or not 0.0 <= config.fraction <= 1.0:
        raise ConfigError("guidance: quantile and fraction must lie in [0, 1]")
    if config.min_guided_steps < 1:
        raise ConfigError("guidance: min_guided_steps must be >= 1")


def similarity(trajectories) -> torch.Tensor:
    """[steps, samples]: cosine similarity of each sample's cond and uncond predictions."""
    cond, uncond = trajectories.output.chunk(2, dim=1)
    return F.cosine_similarity(cond.flatten(2), uncond.flatten(2), dim=2)


def run(program: DiffusionProgram, config: Config, ctx: Context) -> PassResult:
    plan, steps = program.plan, model_calls(program.plan)
    if not uses_guidance(plan, program.spec.conditioning):
        decision = GuidanceDecision("none", "the plan does not use classifier-free guidance")
        return PassResult(program.replace(), decision)
    if plan.cache is not None:
        raise ConfigError("guidance: the plan already has a cache schedule, which depends on the guidance policy")
    calibration = ctx.calibration
    if calibration.steps != steps:
        raise ConfigError("guidance: the calibration trajectories do not match the plan's step count")
    sims = similarity(calibration)
    level = torch.quantile(sims, config.quantile, dim=1)
    scores: dict[int, float] = {}
    if config.policy == "searched":
        switch = steps
        for k in ctx.progress(range(steps - 1, config.min_guided_steps - 1, -1), desc="guidance search", leave=False):
            scores[k] = replay_psnr(program.replace(plan=_policy(plan, k)), calibration)
            if scores[k] < config.min_psnr_db:
                break
            switch = k
    elif config.policy == "adaptive":
        below = [i for i in range(steps) if level[i] < config.threshold]
        switch = below[-1] + 1 if below else 0
    else:
        switch = math.ceil(config.fraction * steps)
    switch = min(steps, max(switch, config.min_guided_steps))
    decision = GuidanceDecision(
        policy=config.policy,
        calibration_psnr_db_by_switch={k: round(v, 2) for k, v in sorted(scores.items())},
        guided_steps=switch,
        unguided_steps=steps - switch,
        network_evaluations=steps + switch,
        network_evaluations_before=2 * steps,
        similarity_quantile_per_step=[round(float(v), 5) for v in level],
        similarity_mean_per_step=[round(float(v), 5) for v in sims.mean(1)],
    )
    return PassResult(program.replace(plan=_policy(plan, switch)), decision)


def _policy(plan: SamplingPlan, switch: int) -> SamplingPlan:
    return dataclasses.replace(plan, guided_steps=tuple(i < switch for i in range(model_calls(plan))))


PASS = Pass(
    name="guidance",
    phase=Phase.GUIDANCE_POLICY,
    config=Config,
    run=run,
    invalidates=frozenset({FLOPS}),
    check=check,
)
