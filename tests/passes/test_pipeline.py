"""The pass contract v2 and the pass manager: phases, up-front checks, invalidation, analyses, records."""

import dataclasses
import types

import pytest
import torch

from core.errors import ConfigError
from core.ir import Decision
from optimizer.report import decision_sections
from passes.analyses import CALIBRATION, FLOPS, Analyses
from passes.base import Context, Pass, PassResult, Phase
from passes.manager import (
    discover_passes,
    offline_context,
    plan_passes,
    register,
    registry,
    run_alternatives,
    run_passes,
)

RAN: list[str] = []
CAPS = frozenset({"fp32", "int8"})


@dataclasses.dataclass
class ScaleConfig:
    scale: float = 1.0
    label: str = "x"


@dataclasses.dataclass(frozen=True)
class Note(Decision):
    name: str
    title = "Note"

    def markdown(self) -> list[str]:
        return [f"- {self.name} ran"]


def make_pass(name, phase=Phase.NUMERICS, returns=None, **fields):
    def run(program, config, ctx):
        RAN.append(name)
        if returns is not None:
            return returns(program)
        return PassResult(program.replace(), Note(name))

    return Pass(name, phase, ScaleConfig, run, **fields)


PASSES = {
    "structure": make_pass("structure", Phase.STRUCTURE),
    "numerics": make_pass("numerics", Phase.NUMERICS, requires=frozenset({"int8"})),
    "recovery": make_pass("recovery", Phase.RECOVERY, needs_earlier=frozenset({Phase.STRUCTURE})),
    "same": make_pass("same", returns=lambda p: PassResult(p, Note("same"))),
    "untyped": make_pass("untyped", returns=lambda p: PassResult(p.replace(), {"free": "form"})),
    "steps": make_pass(
        "steps",
        returns=lambda p: PassResult(p.replace(plan=dataclasses.replace(p.plan, num_inference_steps=5)), Note("")),
    ),
}


@pytest.fixture(autouse=True)
def _clear():
    RAN.clear()


def context(program, capture=None):
    return Context(reference=program, analyses=Analyses(capture), capabilities=CAPS)


def test_recipes_are_ordered_by_phase_with_typed_configs():
    recipe = [{"pass": "numerics", "config": {"scale": 3}}, {"pass": "recovery"}, {"pass": "structure"}]
    planned = plan_passes(recipe, CAPS, PASSES)
    assert [p.name for p in planned] == ["structure", "recovery", "numerics"]
    assert planned[2].config.scale == 3 and planned[0].config.label == "x"


@pytest.mark.parametrize(
    "recipe,message",
    [
        ([{"pass": "nope"}], "unknown pass 'nope'"),
        ([{"pass": "structure", "config": {"sclae": 1.0}}], r"unknown config key\(s\) \['sclae'\]"),
        ([{"pass": "structure", "config": {"scale": "big"}}], "scale must be a number, got 'big'"),
        ([{"pass": "structure", "config": {"scale": True}}], "scale must be a number, got True"),
        ([{"pass": "recovery"}], "needs a structure pass before it"),
        ([{"pass": "structure"}, {"pass": "structure"}], "appears twice"),
        ([{"pass": "numerics"}], r"needs target capabilities \['int8'\]"),
    ],
)
def test_impossible_recipes_are_refused_before_anything_runs(recipe, message):
    with pytest.raises(ConfigError, match=message):
        plan_passes(recipe, frozenset({"fp32"}), PASSES)
    assert RAN == []


def test_passes_run_in_phase_order_and_leave_typed_records(dit_program):
    recipe = [{"pass": "numerics", "config": {"scale": 4.0}}, {"pass": "structure", "config": {"scale": 1.5}}]
    calls = []

    def evaluate(p, ctx):
        calls.append(p.provenance[-1].config["scale"])
        return {"scale": calls[-1]}

    result = run_passes(dit_program, plan_passes(recipe, CAPS, PASSES), context(dit_program), evaluate)
    assert RAN == ["structure", "numerics"]
    assert [(r.name, r.phase) for r in result.provenance] == [("structure", "structure"), ("numerics", "numerics")]
    assert result.provenance[0].config == {"scale": 1.5, "label": "x"}
    assert [r.fidelity["scale"] for r in result.provenance] == [1.5, 4.0] == calls
    assert result.decision("numerics") == Note("numerics") and result.decision("absent") is None
    assert decision_sections(result) == ["", "## Note", "- structure ran", "", "## Note", "- numerics ran"]
    assert dit_program.provenance == ()  # input untouched


@pytest.mark.parametrize(
    "name,message",
    [
        ("same", "must return a new DiffusionProgram"),
        ("untyped", "must return a Decision"),
        ("steps", "changed the loop but does not declare it invalidates calibration"),
    ],
)
def test_the_contract_is_enforced_while_running(dit_program, name, message):
    with pytest.raises(TypeError, match=message):
        run_passes(dit_program, plan_passes([{"pass": name}], CAPS, PASSES), context(dit_program))


def test_a_pass_that_changes_the_loop_gets_calibration_recaptured(dit_program):
    """[sampler(steps=10), X]: X reads trajectories of the new loop, captured once, on demand."""
    captured = []

    def capture(reference):
        captured.append(reference.plan.num_inference_steps)
        return types.SimpleNamespace(steps=reference.plan.num_inference_steps)

    seen = []

    def read(program, config, ctx):
        seen.append(ctx.calibration.steps)
        return PassResult(program.replace(), Note("reader"))

    reader = Pass("reader", Phase.GUIDANCE_POLICY, ScaleConfig, read)
    ctx = context(dit_program, capture)
    ctx.analyses.provide(CALIBRATION, dit_program, types.SimpleNamespace(steps=20))
    recipe = [{"pass": "reader"}, {"pass": "sampler", "config": {"sampling_steps": 10}}]
    passes = {"reader": reader, "sampler": registry()["sampler"]}
    result = run_passes(dit_program, plan_passes(recipe, CAPS, passes), ctx)
    assert [r.name for r in result.provenance] == ["sampler", "reader"]
    assert seen == [10] and captured == [10]
    assert ctx.calibration.steps == 20  # the caller's context still describes the original loop


def test_a_new_reference_pass_becomes_the_reference_of_later_passes(dit_program):
    """A distilled student (new_reference): later passes see it as the reference, on its own loop."""
    import copy

    student = copy.deepcopy(dit_program.denoiser)

    def distil(program, config, ctx):
        plan = dataclasses.replace(program.plan, num_inference_steps=4)
        return PassResult(program.replace(denoiser=student, plan=plan), Note("distil"))

    seen = []

    def read(program, config, ctx):
        seen.append((ctx.reference.denoiser is student, ctx.reference.plan.num_inference_steps))
        return PassResult(program.replace(), Note("reader"))

    passes = {
        "distil": Pass(
            "distil", Phase.DISTILLATION, ScaleConfig, distil, frozenset(), frozenset({CALIBRATION}), new_reference=True
        ),
        "reader": Pass("reader", Phase.NUMERICS, ScaleConfig, read),
    }
    ctx = context(dit_program)
    run_passes(dit_program, plan_passes([{"pass": "reader"}, {"pass": "distil"}], CAPS, passes), ctx)
    assert seen == [(True, 4)]
    assert ctx.reference is dit_program  # the caller's context is untouched


def test_analyses_are_cached_by_fingerprint_including_pass_configs(dit_program, monkeypatch):
    import passes.analyses as analyses_module

    counted = []
    monkeypatch.setattr(analyses_module, "plan_flops", lambda p: counted.append(p) or {"per_image": len(counted)})
    analyses = Analyses()
    assert analyses.flops(dit_program) == analyses.flops(dit_program) == {"per_image": 1}
    a = run_passes(dit_program, plan_passes([{"pass": "structure"}], CAPS, PASSES), context(dit_program))
    b_planned = plan_passes([{"pass": "structure", "config": {"scale": 2.0, "label": "y"}}], CAPS, PASSES)
    b = run_passes(dit_program, b_planned, context(dit_program))
    c = dataclasses.replace(b, provenance=(dataclasses.replace(b.provenance[0], config={"scale": 2.0, "label": "z"}),))
    assert len({dit_program.fingerprint(), a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 4
    # FLOPs survive a pass that does not invalidate them, and are recounted after one that does.
    keeps = make_pass("keeps")
    drops = make_pass("drops", invalidates=frozenset({FLOPS}))
    for p, recounted in ((keeps, 0), (drops, 1)):
        ctx = context(dit_program)
        ctx.flops(dit_program)
        before = ctx.analyses.computed[FLOPS]
        result = run_passes(dit_program, plan_passes([{"pass": p.name}], CAPS, {p.name: p}), ctx)
        ctx.flops(result)
        assert ctx.analyses.computed[FLOPS] - before == recounted


@dataclasses.dataclass
class IdentityConfig:
    note: str = ""


@dataclasses.dataclass(frozen=True)
class IdentityDecision(Decision):
    note: str
    title = "Identity"

    def markdown(self) -> list[str]:
        return [f"- nothing changed ({self.note or 'no note'})"]


def identity(program, config, ctx):
    return PassResult(program.replace(), IdentityDecision(config.note))


def test_a_new_pass_is_one_definition_registered_without_touching_other_files(dit_program):
    """Adding a pass: a Pass value (in a module of `passes/`, found by scanning; or registered, as here)."""
    register(Pass("identity", Phase.NUMERICS, IdentityConfig, identity, doc="changes nothing"))
    planned = plan_passes([{"pass": "identity", "config": {"note": "hello"}}, {"pass": "sampler"}], CAPS)
    assert [p.name for p in planned] == ["sampler", "identity"]
    result = run_passes(dit_program, planned, offline_context(dit_program, calibration=None))
    assert result.decision("identity").to_dict() == {"note": "hello"}
    assert decision_sections(result)[-2:] == ["## Identity", "- nothing changed (hello)"]
    assert (
        torch.equal(next(result.denoiser.parameters()), next(dit_program.denoiser.parameters()))
        and result.denoiser is dit_program.denoiser
    )


def test_discovery_finds_the_shipped_passes_with_their_phases():
    found = discover_passes()
    assert {name: p.phase for name, p in found.items()} == {
        "sampler": Phase.PLAN,
        "schedule": Phase.PLAN,
        "layer_removal": Phase.STRUCTURE,
        "prune": Phase.STRUCTURE,
        "linearize": Phase.STRUCTURE,
        "recover": Phase.RECOVERY,
        "guidance_distill": Phase.DISTILLATION,
        "progressive_distill": Phase.DISTILLATION,
        "consistency_distill": Phase.DISTILLATION,
        "quantize": Phase.NUMERICS,
        "guidance": Phase.GUIDANCE_POLICY,
        "cache": Phase.REUSE_POLICY,
        "warm_start": Phase.REUSE_POLICY,
    }
    assert found["sampler"].invalidates == {CALIBRATION, FLOPS}
    distillations = {"guidance_distill", "progressive_distill", "consistency_distill"}
    assert {name for name, p in found.items() if p.new_reference} == distillations
    for p in found.values():
        assert dataclasses.is_dataclass(p.config) and callable(p.run)


def test_sampler_pass_replans_the_loop(dit_program):
    planned = plan_passes([{"pass": "sampler", "config": {"scheduler": "ddim", "sampling_steps": 8}}], CAPS)
    result = run_passes(dit_program, planned, offline_context(dit_program, calibration=None))
    assert result.plan.scheduler_class == "DDIMScheduler" and result.plan.num_inference_steps == 8
    assert result.plan.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"  # trained schedule kept
    assert result.denoiser is dit_program.denoiser and dit_program.plan.num_inference_steps == 20
    assert result.decision("sampler").sampling_steps_before == 20


@pytest.mark.parametrize(
    "recipe,message",
    [
        ([{"pass": "cache", "config": {"criterion": "first-block"}}], "first-block criterion needs a transformer"),
        ([{"pass": "cache", "config": {"regions": [[0, 3]]}}], "a UNet cache region is"),
        ([{"pass": "sampler", "config": {"sampling_steps": 5000}}], "sampling_steps must be in"),
        # Issue 34's rename: a target written before it is told the new name, not "unknown key".
        ([{"pass": "progressive_distill", "config": {"steps": 4}}], "'steps' is now 'sampling_steps'"),
        ([{"pass": "schedule", "config": {"steps": 4}}], "'steps' is now 'sampling_steps'"),
    ],
)
def test_checks_against_the_model_run_when_the_recipe_is_planned(unet_program, recipe, message):
    with pytest.raises(ConfigError, match=message):
        plan_passes(recipe, CAPS, program=unet_program)


def test_a_pass_needing_an_earlier_phase_accepts_one_already_applied(dit_program):
    structured = run_passes(dit_program, plan_passes([{"pass": "structure"}], CAPS, PASSES), context(dit_program))
    planned = plan_passes([{"pass": "recovery"}], CAPS, PASSES, program=structured)
    assert [r.name for r in run_passes(structured, planned, context(dit_program)).provenance][-1] == "recovery"
    with pytest.raises(ConfigError, match="needs a structure pass applied before it"):
        run_passes(dit_program, planned, context(dit_program))


def test_alternative_recipes_keep_the_one_closest_to_the_original(dit_program):
    """A target's alternatives: every recipe runs from the same program, the highest end-to-end
    calibration PSNR wins (here a fake evaluation scores by the scale the pass was given)."""

    def evaluate(program, ctx):
        scale = program.provenance[-1].config["scale"] if program.provenance else 0.0
        psnr = float("nan") if scale == 9.0 else 30.0 + scale  # a diverged candidate never wins
        return {"calibration_psnr_db": psnr, "flops_per_image": 1e9 * (1 + scale)}

    recipes = [plan_passes([{"pass": "structure", "config": {"scale": s}}], CAPS, PASSES) for s in (1.0, 4.0, 9.0)]
    ctx = context(dit_program)
    kept, choice = run_alternatives(dit_program, recipes, ctx, evaluate)
    assert RAN == ["structure"] * 3 and kept.provenance[-1].config["scale"] == 4.0
    assert choice.chosen == 1 and [row["calibration_psnr_db"] for row in choice.tried][:2] == [31.0, 34.0]
    assert "| structure | 34.00 | 5.000 | yes |" in choice.markdown()
    single, none = run_alternatives(dit_program, recipes[:1], ctx, evaluate)
    assert none is None and single.provenance[-1].config["scale"] == 1.0


def test_a_recipe_that_cannot_apply_leaves_the_others_to_compete(dit_program):
    """cpu-cache on an SD UNet (issue 33): the cache-alone recipe could not reach its FLOPs budget, and its
    refusal aborted the job, throwing away the other recipe's feasible result. Only when every recipe
    refuses does the job stop, with the first refusal."""

    def refuse(program, config, ctx):
        RAN.append("cache")
        raise ConfigError("cache: no schedule reaches the FLOPs budget")

    passes = {**PASSES, "cache": Pass("cache", Phase.NUMERICS, ScaleConfig, refuse)}

    def evaluate(program, ctx):
        return {"calibration_psnr_db": 30.0, "flops_per_image": 1e9}

    structure = plan_passes([{"pass": "structure", "config": {"scale": 2.0}}], CAPS, passes)
    cache = plan_passes([{"pass": "cache"}], CAPS, passes)
    kept, choice = run_alternatives(dit_program, [cache, structure], context(dit_program), evaluate)
    assert RAN == ["cache", "structure"] and kept.provenance[-1].config["scale"] == 2.0
    assert choice.chosen == 1 and choice.tried[0]["refused"] == "cache: no schedule reaches the FLOPs budget"
    with pytest.raises(ConfigError, match="no schedule reaches the FLOPs budget"):
        run_alternatives(dit_program, [cache, cache], context(dit_program), evaluate)
