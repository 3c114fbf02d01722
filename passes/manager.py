"""The pass manager: resolve and check a whole recipe before anything runs, order it by phase, run it.

Checks made up front: every pass is known, its config keys and types, the target's capabilities
(`requires`), config checks against the target (`check`) and the model (`check_program`), no pass
twice, and the phases a pass needs earlier in the recipe (`needs_earlier`). While running it keeps the
contract: a new program each time, and a changed loop only from a pass that declares it invalidates
calibration (then the reference is re-planned and calibration recaptured on the next read).
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from calibration.capture import Trajectories
from core.discovery import module_members
from core.errors import ConfigError
from core.ir import Decision, DiffusionProgram, PassRecord
from core.limits import MAX_CONFIG_INT
from core.progress import timed
from core.validate import number
from passes.analyses import CALIBRATION, FLOPS, Analyses
from passes.base import Context, Pass, PassResult, Phase

INFRASTRUCTURE = ("base", "analyses", "manager", "quantization")  # modules of this package that are not passes
_REGISTERED: dict[str, Pass] = {}
Evaluate = Callable[[DiffusionProgram, Context], dict[str, Any]]
# Programs after each recipe prefix, with the context the next pass gets (prefix_key -> both), so
# recipes that share a prefix (a search's candidates) run it once.
PrefixCache = dict[str, tuple[DiffusionProgram, Context]]


def register(p: Pass) -> Pass:
    """Make a pass defined outside this package known to `registry()` (e.g. a test's or a plugin's)."""
    if not isinstance(p, Pass):
        raise TypeError(f"register() takes a Pass, got {type(p).__name__}")
    _REGISTERED[p.name] = p
    return p


def discover_passes() -> dict[str, Pass]:
    """The `PASS` of every module in this package, by name."""
    found = {}
    for module, p in module_members("passes", "PASS", INFRASTRUCTURE).items():
        if not isinstance(p, Pass):
            raise TypeError(f"passes.{module} defines no PASS = Pass(...)")
        found[p.name] = p
    return found


def registry() -> dict[str, Pass]:
    return {**discover_passes(), **_REGISTERED}


@dataclass(frozen=True)
class PlannedPass:
    spec: Pass
    config: Any

    @property
    def name(self) -> str:
        return self.spec.name


def build_config(p: Pass, values: dict[str, Any]) -> Any:
    cls = p.config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = getattr(cls, "RENAMED", {})
    for old in sorted(set(values) & set(renamed)):
        raise ConfigError(
            f"pass '{p.name}': '{old}' is now '{renamed[old]}' (the loop's step count; `steps` counts training"
            " steps in every pass)"
        )
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"pass '{p.name}': unknown config key(s) {unknown} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        expected = hints[key]
        origin = typing.get_origin(expected) or expected
        if isinstance(origin, type) and (
            (not isinstance(value, origin) and not (origin is float and isinstance(value, int)))
            or (isinstance(value, bool) and origin is not bool)
        ):
            raise ConfigError(f"pass '{p.name}': {key} must be {_type_name(origin)}, got {value!r}")
        if origin in (int, float):
            number(value, f"pass '{p.name}': {key}", -MAX_CONFIG_INT, MAX_CONFIG_INT)
    return cls(**values)


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _type_name(kind: type) -> str:
    return TYPE_NAMES.get(kind, f"a {kind.__name__}")


def plan_passes(
    recipe: list[dict[str, Any]],
    capabilities: frozenset[str],
    passes: dict[str, Pass] | None = None,
    program: DiffusionProgram | None = None,
) -> list[PlannedPass]:
    """The recipe resolved, checked and ordered by phase (recipe order within a phase); with `program`,
    also each pass's checks against the model."""
    known = registry() if passes is None else passes
    planned: list[PlannedPass] = []
    for step in recipe:
        name = step.get("pass")
        if name not in known:
            raise ConfigError(f"unknown pass '{name}' (known: {', '.join(sorted(known)) or 'none'})")
        p = known[name]
        if any(q.name == name for q in planned):
            raise ConfigError(f"pass '{name}' appears twice in the recipe")
        missing = sorted(p.requires - capabilities)
        if missing:
            raise ConfigError(f"pass '{name}' needs target capabilities {missing}, which this target lacks")
        config = build_config(p, step.get("config", {}))
        if p.check is not None:
            p.check(config, capabilities)
        if program is not None and p.check_program is not None:
            p.check_program(config, program)
        planned.append(PlannedPass(p, config))
    planned.sort(key=lambda q: q.spec.phase)
    applied = applied_phases(program) if program is not None else set()
    for i, q in enumerate(planned):
        present = applied | {earlier.spec.phase for earlier in planned[:i]}
        for phase in sorted(q.spec.needs_earlier - present):
            raise ConfigError(f"pass '{q.name}' needs a {phase.name.lower()} pass before it in the recipe")
    return planned


def applied_phases(program: DiffusionProgram) -> set[Phase]:
    """The phases of the passes already applied to `program`."""
    return {Phase[record.phase.upper()] for record in program.provenance}


def prefix_key(planned: list[PlannedPass]) -> str:
    """What identifies a recipe prefix: each pass with its whole config, in order."""
    return json.dumps([[q.name, dataclasses.asdict(q.config)] for q in planned], sort_keys=True, default=str)


def run_passes(
    program: DiffusionProgram,
    planned: list[PlannedPass],
    ctx: Context,
    evaluate: Evaluate | None = None,
    log: Callable[[str], None] = lambda _: None,
    cache: PrefixCache | None = None,
) -> DiffusionProgram:
    """Run the planned passes in order; after each, `evaluate` (if given) measures the result for the
    record. `ctx` is not modified: a pass that changed the loop re-plans a copy's reference. With
    `cache` (for one starting program and context), a prefix already run is taken from it."""
    ctx = dataclasses.replace(ctx, origin=ctx.origin or ctx.reference)
    done = 0
    if cache is not None:
        for end in range(len(planned), 0, -1):
            if (hit := cache.get(prefix_key(planned[:end]))) is not None:
                program, ctx = hit
                done = end
                log(f"reusing the program after {' + '.join(q.name for q in planned[:end])}")
                break
    for i, q in enumerate(planned[done:], done):
        for phase in sorted(q.spec.needs_earlier - applied_phases(program)):
            raise ConfigError(f"pass '{q.name}' needs a {phase.name.lower()} pass applied before it")
        with timed(log, f"pass {i + 1}/{len(planned)} '{q.name}' ({q.spec.phase.name.lower()})"):
            start = time.perf_counter()
            result = q.spec.run(program, q.config, ctx)
            seconds = time.perf_counter() - start
        if not isinstance(result, PassResult) or not isinstance(result.program, DiffusionProgram):
            raise TypeError(f"pass '{q.name}' must return PassResult(program, decision)")
        if result.program is program:
            raise TypeError(f"pass '{q.name}' must return a new DiffusionProgram")
        if not isinstance(result.decision, Decision):
            raise TypeError(f"pass '{q.name}' must return a Decision, got {type(result.decision).__name__}")
        loop_changed = result.program.plan.without_loop_policy() != program.plan.without_loop_policy()
        if loop_changed and CALIBRATION not in q.spec.invalidates:
            raise TypeError(f"pass '{q.name}' changed the loop but does not declare it invalidates calibration")
        record = PassRecord(
            q.name, q.spec.phase.name.lower(), dataclasses.asdict(q.config), result.decision, {}, round(seconds, 3)
        )
        new = result.program.replace(provenance=(*result.program.provenance, record))
        if q.spec.new_reference:
            ctx = dataclasses.replace(ctx, reference=new.replace(plan=new.plan.without_loop_policy()))
        elif CALIBRATION in q.spec.invalidates:
            ctx = dataclasses.replace(ctx, reference=ctx.reference.replace(plan=new.plan.without_loop_policy()))
        if FLOPS not in q.spec.invalidates:
            ctx.analyses.carry_over(FLOPS, program, new)
        if evaluate is not None:
            record = dataclasses.replace(record, fidelity=evaluate(new, ctx))
            new = new.replace(provenance=(*new.provenance[:-1], record))
        program = new
        if cache is not None:
            cache[prefix_key(planned[: i + 1])] = (program, ctx)
    return program


@dataclass(frozen=True)
class RecipeChoice(Decision):
    """Which of a target's recipes ran: each was run on the calibration seeds and the one whose samples
    stay closest to the original loop's (end-to-end PSNR) was kept."""

    tried: list[dict[str, Any]]  # per recipe: passes, calibration_psnr_db, flops_per_image
    chosen: int

    title = "Recipe selection"

    def markdown(self) -> list[str]:
        lines = [
            "Each of the target's recipes ran on the calibration seeds; the one closest to the original end to end"
            " was kept.",
            "",
            "| recipe | calibration PSNR (dB) | FLOPs per image (G) | kept |",
            "|---|---|---|---|",
        ]
        for i, row in enumerate(self.tried):
            if row.get("refused"):
                lines.append(f"| {row['passes']} | does not apply: {row['refused']} | - | |")
                continue
            flops = row["flops_per_image"] / 1e9
            kept = "yes" if i == self.chosen else ""
            lines.append(f"| {row['passes']} | {row['calibration_psnr_db']:.2f} | {flops:.3f} | {kept} |")
        return lines


def run_alternatives(
    program: DiffusionProgram,
    recipes: list[list[PlannedPass]],
    ctx: Context,
    evaluate: Evaluate,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[DiffusionProgram, RecipeChoice | None]:
    """Run each planned recipe from `program`; keep the one with the highest end-to-end calibration PSNR
    (`evaluate` after its last pass). One recipe: just run it (no choice to report)."""
    if len(recipes) == 1:
        return run_passes(program, recipes[0], ctx, evaluate, log), None
    candidates: list[DiffusionProgram | None] = []
    tried: list[dict[str, Any]] = []
    refusals: list[Exception] = []
    for i, planned in enumerate(recipes):
        names = " + ".join(q.name for q in planned) or "no passes"
        log(f"recipe {i + 1}/{len(recipes)}: {names}")
        try:
            candidate = run_passes(program, planned, ctx, evaluate, log)
        except ConfigError as exc:  # this model cannot meet this recipe (e.g. its budget): the others compete
            log(f"recipe {i + 1} does not apply: {exc}")
            refusals.append(exc)
            candidates.append(None)
            tried.append({"passes": names, "refused": str(exc), "calibration_psnr_db": None, "flops_per_image": None})
            continue
        fidelity = candidate.provenance[-1].fidelity if candidate.provenance else evaluate(candidate, ctx)
        candidates.append(candidate)
        tried.append(
            {
                "passes": names,
                "calibration_psnr_db": fidelity["calibration_psnr_db"],
                "flops_per_image": fidelity["flops_per_image"],
            }
        )
    if len(refusals) == len(recipes):
        raise refusals[0]
    scores: list[float] = [row["calibration_psnr_db"] for row in tried]
    best = max(
        (i for i in range(len(scores)) if candidates[i] is not None),
        key=lambda i: scores[i] if scores[i] == scores[i] else float("-inf"),
    )
    log(f"kept recipe {best + 1} ({tried[best]['passes']}): calibration PSNR {scores[best]:.2f} dB")
    kept = candidates[best]
    assert kept is not None  # best is among the recipes that applied
    return kept, RecipeChoice(tried, best)


def offline_context(
    reference: DiffusionProgram,
    calibration: Trajectories,
    capabilities: frozenset[str] = frozenset({"fp32"}),
    progress: Callable[..., Iterable] = lambda it, **_: it,
) -> Context:
    """A context for running passes outside a job (the comparison commands), on given calibration."""
    analyses = Analyses()
    analyses.provide(CALIBRATION, reference, calibration)
    return Context(reference, analyses, capabilities, progress=progress)


def quick_fidelity(program: DiffusionProgram, ctx: Context) -> dict[str, Any]:
    """After a pass, on the calibration seeds: teacher-forced model-output error on the current loop's
    trajectories, and the end-to-end PSNR of its samples vs the original loop's (before any pass)."""
    from core.sampling import uses_guidance
    from core.variants import torch_loop
    from verify.fidelity import replay_psnr, step_errors

    loop = torch_loop(program)
    # A distilled student is its own reference from here on: no teacher-forced error to measure.
    own = ctx.reference.denoiser is program.denoiser
    errors = [] if own else step_errors(ctx.calibration, program.plan, program.spec.conditioning, loop)
    return {
        "calibration_psnr_db": replay_psnr(program, ctx.analyses.calibration(ctx.origin or ctx.reference), loop),
        "eps_rel_error_mean": sum(errors) / len(errors) if errors else None,
        "eps_rel_error_max": max(errors) if errors else None,
        "guidance": uses_guidance(program.plan, program.spec.conditioning),
        "flops_per_image": ctx.flops(program)["per_image"],
    }


__all__ = [
    "Analyses",
    "Context",
    "Phase",
    "PlannedPass",
    "PrefixCache",
    "RecipeChoice",
    "build_config",
    "offline_context",
    "plan_passes",
    "prefix_key",
    "quick_fidelity",
    "register",
    "run_alternatives",
    "run_passes",
]
