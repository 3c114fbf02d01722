"""One search trial: a candidate recipe run (prefixes reused), judged by the proxies and timed.

Speed is measured, not estimated: the candidate is lowered on the target's backend and its whole loop
for one image is timed in alternating blocks with the original's fp32 graph on the same backend
(verify.timing), so the objective is a ratio taken side by side, robust to the machine's drift. A policy's
is its time per decision at batch 1 over an episode: with warm-started chunks (core.warm_start), the first
decision's whole loop and the later decisions' tail, weighed as an episode of its environment's step limit
holds them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import warm_start
from core.environments import decisions_per_episode
from core.errors import ConfigError
from core.ir import DiffusionProgram
from core.sampling import network_evaluations
from passes.base import Context
from passes.manager import PlannedPass, PrefixCache, plan_passes, prefix_key, quick_fidelity, run_passes
from search.proxy import ProxySet, constraints
from search.space import SearchSpace
from verify.judges import JudgePlan
from verify.timing import paired_median_ms


class TrialRunner:
    """Everything trials share in one process: the original, the pass context, the proxy set, the
    original's lowered fp32 graph and the programs after every recipe prefix run so far."""

    def __init__(
        self,
        program: DiffusionProgram,
        ctx: Context,
        space: SearchSpace,
        gates: dict[str, float],
        backend: Any,
        log: Callable[[str], None],
        judges: JudgePlan | None = None,
    ) -> None:
        """`gates`: the applicable ones (see verify.gates.plan_gates); `judges`: the model's (default: those
        that apply without user-supplied feature models)."""
        self.program, self.ctx, self.space, self.gates, self.backend, self.log = (
            program,
            ctx,
            space,
            gates,
            backend,
            log,
        )
        self.cache: PrefixCache = {}
        self._lowered: dict[int, tuple[DiffusionProgram, Any]] = {}  # id(program) -> (program, its runner)
        self.folder = Path(tempfile.mkdtemp(prefix="search-"))
        self.proxy = ProxySet(program, space.proxy_samples, plan=judges)
        self.baseline = self._lower(program)
        self.seeds, self.conditions = (
            self.proxy.seeds[:1],
            None if self.proxy.conditions is None else self.proxy.conditions[:1],
        )

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def recipe(self, params: dict[str, str], full: bool) -> list[dict[str, Any]]:
        return self.space.recipe(params, 1.0 if full else self.space.proxy_budget)

    def candidate(self, params: dict[str, str], full: bool) -> DiffusionProgram:
        """The program of `params`' recipe (full budget or the trials' proxy budget), prefixes reused.
        A knob choice whose passes all leave the program as it was (e.g. a guidance policy after guidance
        distillation) makes the candidate a copy of another: refused as not applicable."""
        planned = plan_passes(self.recipe(params, full), self.ctx.capabilities, program=self.program)
        program = run_passes(self.program, planned, self.ctx, quick_fidelity, self.log, cache=self.cache)
        if idle := idle_knobs(self.space, params, planned, self.program, self.cache):
            raise ConfigError(
                f"{', '.join(idle)} changes nothing in this recipe ({' + '.join(q.name for q in planned)})"
            )
        return program

    def evaluate(self, params: dict[str, str]) -> dict[str, Any]:
        """Proxy metrics, constraints and measured speed of `params`' recipe at the proxy budget."""
        start = time.perf_counter()
        candidate = self.candidate(params, full=False)
        fidelity = candidate.provenance[-1].fidelity if candidate.provenance else quick_fidelity(candidate, self.ctx)
        metrics = {
            **self.proxy.measure(candidate),
            "calibration_psnr_db": fidelity["calibration_psnr_db"],
            "eps_rel_error_max": fidelity["eps_rel_error_max"],
            "flops_per_image": fidelity["flops_per_image"],
            "nfe": network_evaluations(candidate.plan, candidate.spec.conditioning),
        }
        metrics.update(self.time([candidate])[0])
        metrics["constraints"] = constraints(metrics, self.gates)
        metrics["feasible"] = all(c <= 0 for c in metrics["constraints"].values())
        metrics["seconds"] = round(time.perf_counter() - start, 1)
        return metrics

    def time(self, programs: list[DiffusionProgram]) -> list[dict[str, float]]:
        """Each program's whole loop for one image on the backend, side by side with the original's."""
        runners = {"original": self.baseline}
        for i, program in enumerate(programs):
            runners[f"c{i}"] = self._lower(program)
        loops = {k: (lambda r=r: r.sample(self.seeds, self.conditions)) for k, r in runners.items()}
        warm = {f"{k} warm": loop for k, r in runners.items() if (loop := self._warm_loop(r)) is not None}
        ms = paired_median_ms(
            loops | warm, repeats=self.space.latency_repeats, warmup=1, rounds=min(4, self.space.latency_repeats)
        )
        decisions = self._decisions()
        for k in runners:  # a warm-started policy's mean decision over an episode
            if f"{k} warm" in ms:
                ms[k] = warm_start.episode_mean(ms[k], ms[f"{k} warm"], decisions)
        return [
            {"loop_ms": ms[f"c{i}"], "original_loop_ms": ms["original"], "speedup": ms["original"] / ms[f"c{i}"]}
            for i in range(len(programs))
        ]

    def _decisions(self) -> int:
        """Decisions per episode of a policy with an environment (--env or its own: the job attached it); 1
        otherwise (the first decision is timed)."""
        chunking, env = self.program.spec.chunking, self.program.stages.environment
        return 1 if chunking is None or env is None else decisions_per_episode(env, chunking.n_action_steps)

    def _warm_loop(self, runner: Any) -> Callable[[], Any] | None:
        """A warm-started decision of the runner's plan (from its first decision's chunk), or None."""
        plan, chunking = runner.plan.sampling, self.program.spec.chunking
        if plan.warm_start is None or chunking is None:
            return None
        warm = warm_start.WarmStart(plan, chunking)
        start = warm.start(runner.sample(self.seeds, self.conditions), self.seeds)
        return lambda: runner.sample(self.seeds, self.conditions, plan=warm.plan, start=start)

    def _lower(self, program: DiffusionProgram) -> Any:
        """The program lowered on the backend, once per program (an empty recipe is the original itself;
        the attribution's prefixes were often trials already)."""
        if id(program) not in self._lowered:
            # A folder of its own per attempt: a lowering that failed (a trial found not applicable) left
            # its folder, and the next program must not reuse that name (it did: FileExistsError, exit 3).
            folder = Path(tempfile.mkdtemp(prefix=f"g{len(self._lowered)}-", dir=self.folder))
            self.backend.lower(program, folder)
            self._lowered[id(program)] = (program, self.backend.runner(folder))  # the program keeps its id
        return self._lowered[id(program)][1]


def idle_knobs(
    space: SearchSpace, params: dict[str, str], planned: list[PlannedPass], start: DiffusionProgram, cache: PrefixCache
) -> list[str]:
    """The knob choices (`knob=choice`) whose passes all left the program as they found it: the same network
    object and an equal loop (`cache` holds the program after every prefix of `planned`)."""
    changed: dict[str, bool] = {}
    before = start
    for end, q in enumerate(planned, 1):
        after = cache[prefix_key(planned[:end])][0]
        same = after.denoiser is before.denoiser and after.plan == before.plan
        changed[q.name] = changed.get(q.name, False) or not same
        before = after
    idle = []
    for knob in space.knobs:
        names = {step["pass"] for step in knob.choices[params[knob.name]]}
        if names and not any(changed.get(n, True) for n in names):
            idle.append(f"{knob.name}={params[knob.name]}")
    return idle
