"""Item 5: the pass contract and the pass manager's checks, which all happen before any pass runs."""

import dataclasses
import types

import pytest

from optimizer.errors import ConfigError
from optimizer.pipeline import Context, discover_passes, plan_passes, run_passes

RAN: list[str] = []


def make_pass(name, after=(), before=(), requires=(), returns_same=False):
    @dataclasses.dataclass
    class Config:
        scale: float = 1.0
        label: str = "x"

    def run(program, ctx):
        RAN.append(name)
        if returns_same:
            return program
        return program.replace(plan=dataclasses.replace(program.plan, guidance_scale=ctx.config.scale))

    return types.SimpleNamespace(NAME=name, Config=Config, run=run, AFTER=after, BEFORE=before, REQUIRES=requires)


REGISTRY = {
    "prune": make_pass("prune", before=("quantize",)),
    "quantize": make_pass("quantize", after=("prune",), requires=("int8",)),
    "same": make_pass("same", returns_same=True),
}
CAPS = frozenset({"fp32", "int8"})


@pytest.fixture(autouse=True)
def _clear():
    RAN.clear()


def test_recipe_is_resolved_with_typed_configs():
    planned = plan_passes([{"pass": "prune", "config": {"scale": 3}}, {"pass": "quantize"}], CAPS, REGISTRY)
    assert [p.name for p in planned] == ["prune", "quantize"]
    assert planned[0].config.scale == 3 and planned[1].config.label == "x"


@pytest.mark.parametrize(
    "recipe,message",
    [
        ([{"pass": "nope"}], "unknown pass 'nope'"),
        ([{"pass": "prune", "config": {"sclae": 1.0}}], r"unknown config key\(s\) \['sclae'\]"),
        ([{"pass": "prune", "config": {"scale": "big"}}], "scale must be"),
        ([{"pass": "quantize"}, {"pass": "prune"}], "must run after 'prune'|must run before 'quantize'"),
    ],
)
def test_invalid_recipes_are_rejected_before_anything_runs(recipe, message):
    with pytest.raises(ConfigError, match=message):
        plan_passes(recipe, CAPS, REGISTRY)
    assert RAN == []


def test_capabilities_are_checked():
    with pytest.raises(ConfigError, match=r"needs target capabilities \['int8'\]"):
        plan_passes([{"pass": "quantize"}], frozenset({"fp32"}), REGISTRY)


def test_passes_run_in_order_and_leave_provenance(dit_program):
    planned = plan_passes(
        [{"pass": "prune", "config": {"scale": 1.5}}, {"pass": "quantize", "config": {"scale": 4.0}}], CAPS, REGISTRY
    )
    calls = []
    ctx = Context(
        reference=dit_program,
        calibration=None,
        capabilities=CAPS,
        evaluate=lambda p: calls.append(p.plan.guidance_scale) or {"guidance": p.plan.guidance_scale},
    )
    result = run_passes(dit_program, planned, ctx)
    assert RAN == ["prune", "quantize"]
    assert [r.name for r in result.provenance] == ["prune", "quantize"]
    assert result.provenance[0].config == {"scale": 1.5, "label": "x"}
    assert [r.fidelity["guidance"] for r in result.provenance] == [1.5, 4.0] == calls
    assert dit_program.provenance == () and dit_program.plan.guidance_scale == 2.0  # input untouched


def test_a_pass_must_return_a_new_program(dit_program):
    planned = plan_passes([{"pass": "same"}], CAPS, REGISTRY)
    ctx = Context(reference=dit_program, calibration=None, capabilities=CAPS, evaluate=lambda p: {})
    with pytest.raises(TypeError, match="must return a new DiffusionProgram"):
        run_passes(dit_program, planned, ctx)


def test_discovery_finds_the_shipped_passes():
    found = discover_passes()
    assert "sampler" in found
    for module in found.values():
        assert dataclasses.is_dataclass(module.Config) and callable(module.run)


def test_sampler_pass_replans_the_loop(dit_program):
    planned = plan_passes([{"pass": "sampler", "config": {"scheduler": "ddim", "steps": 8}}], CAPS)
    ctx = Context(reference=dit_program, calibration=None, capabilities=CAPS, evaluate=lambda p: {})
    result = run_passes(dit_program, planned, ctx)
    assert result.plan.scheduler_class == "DDIMScheduler" and result.plan.num_inference_steps == 8
    assert result.plan.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"  # trained schedule kept
    assert result.denoiser is dit_program.denoiser and dit_program.plan.num_inference_steps == 20
