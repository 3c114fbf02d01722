"""Issue 4: loop-level passes -- guidance policy and cache schedules -- and their lowering to graph variants."""

import dataclasses
import itertools
import json
import math

import pytest
import torch
from helpers import lower, run_recipe

from backends.plan import read_plan
from backends.registry import open_runner
from calibration import capture as calib
from calibration.capture import evaluation_set
from core.adapters import denoiser_module
from core.caching import variant_module
from core.errors import ConfigError, LoadError
from core.flops import count_flops, plan_flops, variant_flops
from core.ir import CacheSchedule, SamplingPlan
from core.pixels import to_images
from core.schedulers import check_plan
from core.variants import sample_program, torch_loop
from passes.cache import BUDGET_STEP, best_refresh
from passes.manager import plan_passes
from verify.fidelity import replay_psnr, step_errors
from verify.metrics import psnr

DIT_REGIONS = [(0, 1), (0, 8), (1, 8), (3, 6), (7, 8)]
UNET_REGIONS = [(1, 3), (2, 3)]


def inputs(batch=4):
    torch.manual_seed(1)
    return torch.randn(batch, 1, 16, 16), torch.tensor([950.0, 600.0, 300.0, 0.0][:batch]), torch.tensor([1, 5, 10, 9])


@pytest.fixture(scope="module")
def calibrations(dit_program, unet_program):
    return {
        "dit": calib.capture(dit_program, *evaluation_set(dit_program, 8, 10_000)),
        "unet": calib.capture(unet_program, *evaluation_set(unet_program, 8, 10_000)),
    }


def run(program, calibration, recipe):
    return run_recipe(program, calibration, recipe)


def with_cache(program, region, refresh, guided=None):
    n = program.plan.num_inference_steps
    schedule = CacheSchedule(program.spec.family, region, tuple(i in refresh for i in range(n)))
    guided_steps = None if guided is None else tuple(i < guided for i in range(n))
    return program.replace(plan=dataclasses.replace(program.plan, cache=schedule, guided_steps=guided_steps))


@pytest.mark.parametrize(("family", "regions"), [("dit", DIT_REGIONS), ("unet", UNET_REGIONS)])
def test_variants_restate_the_diffusers_forward(family, regions, request):
    program = request.getfixturevalue(f"{family}_program")
    x, t, y = inputs()
    with torch.no_grad():
        reference = denoiser_module(program)(x, t, y)
        for region in regions:
            out, stored = variant_module(program, "full", region)(x, t, y)
            assert torch.equal(out, reference), region  # the full variant is the model, bit for bit
            # Fed the tensor stored at this very step, the cached variant gives the same output.
            cached = variant_module(program, "cached", region)(x, t, y, stored)
            torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-5)
            # Fed another step's tensor, it does not: the region really is skipped.
            other = variant_module(program, "full", region)(x, t.flip(0), y)[1]
            assert not torch.allclose(variant_module(program, "cached", region)(x, t, y, other), reference, atol=1e-3)


def test_bad_regions_and_schedules_are_refused(dit_program, unet_program):
    with pytest.raises(ConfigError, match="outside"):
        variant_module(dit_program, "full", (2, 9))
    with pytest.raises(ConfigError, match="first >= 1"):
        variant_module(unet_program, "full", (0, 3))
    with pytest.raises(ConfigError, match=r"first >= 1 \(levels recomputed\)"):
        variant_module(unet_program, "full", (1, 2))
    with pytest.raises(ValueError, match="refresh at step 0"):
        CacheSchedule("dit", (0, 8), (False, True))
    plan = dit_program.plan
    # One entry per model call: the scheduler knows how many (core.schedulers.check_plan).
    with pytest.raises(ConfigError, match="cache schedule has 2 entries for the loop's 20 model calls"):
        check_plan(dataclasses.replace(plan, cache=CacheSchedule("dit", (0, 8), (True, False))))
    # A guided step cannot reuse the cache written by an unguided (cond-only, half-batch) step.
    refresh = tuple(i in (0, 5) for i in range(20))
    guided = tuple(i != 5 for i in range(20))
    with pytest.raises(ValueError, match="step 6 is guided but reuses features of unguided step 5"):
        dataclasses.replace(plan, cache=CacheSchedule("dit", (0, 8), refresh), guided_steps=guided)


def test_plan_round_trips_through_json(dit_program):
    plan = with_cache(dit_program, (1, 8), (0, 3, 9), guided=12).plan
    assert SamplingPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert [plan.variant(i) for i in range(4)] == ["full", "cached", "cached", "full"]
    assert plan.guided(11) and not plan.guided(12)


def test_flops_are_counted_on_real_calls(dit_program):
    assert count_flops(torch.nn.Linear(10, 20), torch.zeros(3, 10)) == 2 * 3 * 10 * 20
    q = torch.zeros(1, 2, 8, 4)  # attention: QK^T and AV, 2 heads x 8 x 8 x 4 multiply-adds each
    assert count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q) == 2 * 2 * (2 * 8 * 8 * 4)
    base = plan_flops(dit_program)
    assert base["network_evaluations"] == 40 and base["per_image"] == 40 * base["per_variant"]["denoiser"]
    cached = with_cache(dit_program, (1, 8), (0, 10), guided=15)
    per = variant_flops(cached)
    assert per["full"] == base["per_variant"]["denoiser"] and per["cached"] < per["full"] / 5  # 1 of 8 blocks
    # steps 0, 10 full; 0..14 guided (x2)
    expected = 2 * 2 * per["full"] + (2 * 13 + 5) * per["cached"]
    assert plan_flops(cached) == {"per_image": expected, "per_variant": per, "network_evaluations": 35}


def test_refresh_search_is_exact():
    """The dynamic program finds the true optimum (checked by brute force) under a weighted budget."""
    gen = torch.Generator().manual_seed(0)
    steps = 8
    cost = torch.rand(steps, steps, generator=gen).tolist()
    weights = [2, 2, 2, 1, 1, 1, 1, 1]
    for capacity in (2, 4, 6, 9):
        error, refresh = best_refresh(cost, weights, capacity)
        best = math.inf
        for k in range(steps):
            for rest in itertools.combinations(range(1, steps), k):
                chosen = (0, *rest)
                if sum(weights[i] for i in chosen) > capacity:
                    continue
                total = sum(cost[max(j for j in chosen if j <= i)][i] for i in range(steps) if i not in chosen)
                best = min(best, total)
        assert error == pytest.approx(best) and refresh[0] == 0
        assert sum(weights[i] for i in refresh) <= capacity


def test_guidance_pass_policies(dit_program, calibrations):
    traj = calibrations["dit"]
    searched = run(dit_program, traj, [{"pass": "guidance", "config": {"min_psnr_db": 35.0}}])
    decision = searched.decision("guidance").to_dict()
    k = decision["guided_steps"]
    assert 1 <= k < 20 and searched.plan.guided_steps == tuple(i < k for i in range(20))
    # The chosen switch clears the bound end to end, and the next earlier one does not.
    scores = decision["calibration_psnr_db_by_switch"]
    assert scores[k] >= 35.0 and (k - 1 not in scores or scores[k - 1] < 35.0)
    assert replay_psnr(searched, traj) == pytest.approx(scores[k], abs=0.01)
    assert plan_flops(searched)["network_evaluations"] == 20 + k

    early = run(dit_program, traj, [{"pass": "guidance", "config": {"policy": "early", "fraction": 0.25}}])
    assert early.plan.guided_steps == tuple(i < 5 for i in range(20))
    unguided = dit_program.replace(plan=dataclasses.replace(dit_program.plan, guidance_scale=1.0))
    unguided_traj = calib.capture(unguided, *evaluation_set(unguided, 2, 10_000))
    assert run(unguided, unguided_traj, [{"pass": "guidance"}]).plan.guided_steps is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"policy": "sometimes"}, "unknown policy"),
        ({"quantile": 2.0}, "quantile and fraction"),
    ],
)
def test_bad_guidance_configs(config, message):
    with pytest.raises(ConfigError, match=message):
        plan_passes([{"pass": "guidance", "config": config}], frozenset())


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ([{"pass": "cache", "config": {"flops_budget": 0.0}}], "flops_budget"),
        ([{"pass": "cache", "config": {"criterion": "vibes"}}], "unknown criterion"),
        ([{"pass": "cache", "config": {"min_psnr_db": -1.0}}], "min_psnr_db"),
    ],
)
def test_bad_cache_configs(recipe, message):
    with pytest.raises(ConfigError, match=message):
        plan_passes(recipe, frozenset())


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_cache_pass_meets_the_budget_with_the_best_end_to_end_candidate(family, request, calibrations):
    program, traj = request.getfixturevalue(f"{family}_program"), calibrations[family]
    regions = [[0, 8], [1, 8], [0, 6], [2, 8]] if family == "dit" else []  # a subset, for test time
    recipe = [{"pass": "guidance"}, {"pass": "cache", "config": {"flops_budget": 0.5, "regions": regions}}]
    result = run(program, traj, recipe)
    decision = result.decision("cache").to_dict()
    assert result.plan.cache is not None and result.plan.cache.refresh[0]
    ratio = plan_flops(result)["per_image"] / plan_flops(program)["per_image"]
    assert ratio <= 0.5 and ratio == pytest.approx(decision["flops_vs_original"], abs=1e-4)
    psnrs = [c["calibration_psnr_db"] for c in decision["candidates"]]
    assert decision["calibration_psnr_db"] == max(psnrs)
    assert replay_psnr(result, traj) == pytest.approx(decision["calibration_psnr_db"], abs=0.01)
    # Every criterion's schedule was a candidate; one alone (FORA's fixed interval) does no better end to end.
    region = [list(decision["region"])]
    expected = {"similarity", "uniform", "first-block"} if family == "dit" else {"similarity", "uniform"}
    assert set(decision["criteria_tried"]) == expected
    for criterion in ["uniform"]:
        config = {"criterion": criterion, "regions": region}
        alone = run(program, traj, [*recipe[:1], {"pass": "cache", "config": config}])
        assert replay_psnr(result, traj) >= replay_psnr(alone, traj)
        assert plan_flops(alone)["per_image"] / plan_flops(program)["per_image"] <= 0.5


def test_cache_pass_errors(dit_program, unet_program, calibrations):
    with pytest.raises(ConfigError, match="no schedule fits"):
        run(dit_program, calibrations["dit"], [{"pass": "cache", "config": {"flops_budget": 0.05}}])
    with pytest.raises(ConfigError, match="first-block criterion needs a transformer"):
        run(unet_program, calibrations["unet"], [{"pass": "cache", "config": {"criterion": "first-block"}}])
    with pytest.raises(ConfigError, match="outside"):
        run(dit_program, calibrations["dit"], [{"pass": "cache", "config": {"regions": [[0, 12]]}}])
    first_block = run(
        dit_program,
        calibrations["dit"],
        [{"pass": "cache", "config": {"criterion": "first-block", "regions": [[1, 8]]}}],
    )
    assert plan_flops(first_block)["per_image"] <= 0.5 * plan_flops(dit_program)["per_image"]


def test_a_psnr_floor_relaxes_the_budget_until_the_schedule_keeps_it(dit_program, calibrations):
    traj, regions = calibrations["dit"], [[0, 8], [2, 8]]  # a subset, for test time
    tight = run(dit_program, traj, [{"pass": "cache", "config": {"flops_budget": 0.3, "regions": regions}}])
    at_budget = tight.decision("cache").to_dict()["calibration_psnr_db"]
    floor = at_budget + 3.0  # more than any schedule under 0.3 keeps
    config = {"flops_budget": 0.3, "regions": regions, "min_psnr_db": floor}
    relaxed = run(dit_program, traj, [{"pass": "cache", "config": config}]).decision("cache").to_dict()
    reached = relaxed["flops_budget_reached"]
    assert reached > 0.3 and relaxed["calibration_psnr_db"] >= floor
    assert relaxed["flops_vs_original"] <= reached + 1e-9
    # The budget one step lower had no schedule that kept the floor (every one was run end to end).
    below = [c for c in relaxed["candidates"] if c["flops_vs_original"] <= reached - BUDGET_STEP + 1e-9]
    assert below and max(c["calibration_psnr_db"] for c in below) < floor
    with pytest.raises(ConfigError, match="no schedule keeps min_psnr_db 200 dB"):
        config = {"regions": [[0, 8]], "criterion": "uniform", "min_psnr_db": 200.0}  # one schedule per budget
        run(dit_program, traj, [{"pass": "cache", "config": config}])


def test_loop_step_errors_see_the_cache(dit_program, calibrations):
    traj = calibrations["dit"]
    cached = with_cache(dit_program, (0, 8), (0, 10), guided=15)
    errors = step_errors(traj, cached.plan, cached.spec.conditioning, torch_loop(cached))
    assert errors[0] < 1e-5 and errors[10] < 1e-5  # refresh steps on guided inputs are exact
    assert min(errors[1:10]) > 1e-3 and errors[15] > 1e-3  # reuse and dropped guidance are not


@pytest.mark.parametrize(("family", "region"), [("tiny_digits", (1, 2)), ("unet", (1, 3))])  # tiny: a 2-block DiT
def test_ort_runner_reproduces_the_torch_cached_sampler(family, region, request, tmp_path):
    program = with_cache(request.getfixturevalue(f"{family}_program"), region, (0, 3, 6, 9, 12, 15, 18), guided=12)
    artifacts = lower(program, tmp_path)
    assert artifacts["onnx"] == ["denoiser_full.onnx", "denoiser_cached.onnx"]
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["graphs"]["full"]["outputs"] == ["model_output", "cache"]
    assert doc["graphs"]["cached"]["inputs"][-1] == "cache"
    assert doc["steps"][3] == {
        "index": 3,
        "timestep": doc["timesteps"][3],
        "graph": "full",
        "guidance": True,
        "reads": [],
        "writes": ["cache"],
    }
    assert doc["steps"][13]["graph"] == "cached" and doc["steps"][13]["reads"] == ["cache"]
    assert not doc["steps"][13]["guidance"]
    seeds, labels = list(range(6)), list(range(6))
    reference = sample_program(program, seeds, labels, torch_loop(program))
    candidate = open_runner(tmp_path).sample(seeds, labels)
    assert psnr(to_images(reference), to_images(candidate)).min() >= 60.0
    # A plan whose steps name a graph the plan's schedule does not run is refused.
    doc["steps"][1]["graph"] = "full"
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="step 1 names graph 'full'"):
        read_plan(tmp_path)


class ScriptedCheck:
    """A stand-in for verify.floor_check.FloorCheck: the shift falls as the schedule's FLOPs rise."""

    floor = 0.5

    sampled: tuple = ()  # the schedules judged, in order (a list set per test)

    def __init__(self, original, *_, **__):
        self.original = original

    def shift(self, candidate):
        self.sampled.append(candidate.plan.cache.refresh)
        return 2.0 - plan_flops(candidate)["per_image"] / plan_flops(self.original)["per_image"]


def test_a_distribution_bound_relaxes_the_budget_until_the_best_schedule_keeps_it(
    dit_program, calibrations, monkeypatch
):
    monkeypatch.setattr("passes.analyses.FloorCheck", ScriptedCheck)
    monkeypatch.setattr(ScriptedCheck, "sampled", [])
    traj = calibrations["dit"]
    config = {"flops_budget": 0.4, "regions": [[0, 8]], "criterion": "similarity", "max_fd_shift": 1.45}
    decision = run(dit_program, traj, [{"pass": "cache", "config": config}]).decision("cache").to_dict()
    rows = decision["distribution"]
    # One check per budget, 0.4 upward, until the best schedule's shift (2 - its FLOPs fraction) held.
    assert [r["budget"] for r in rows] == [round(0.4 + BUDGET_STEP * i, 6) for i in range(len(rows))]
    assert all(r["fd_shift"] > 1.45 for r in rows[:-1]) and rows[-1]["fd_shift"] <= 1.45
    assert decision["flops_budget_reached"] == rows[-1]["budget"] > 0.4
    assert decision["flops_vs_original"] >= 0.55 - 1e-9  # 2 - shift, shift <= 1.45
    assert rows[-1]["refresh_steps"] == decision["refresh_steps"]
    # A schedule that stays the best as the budget relaxes is sampled once.
    distinct = list(dict.fromkeys(tuple(r["refresh_steps"]) for r in rows))
    assert len(ScriptedCheck.sampled) == len(distinct) <= len(rows)
    with pytest.raises(ConfigError, match=r"no schedule keeps the distribution \(shift <= 0.5\)"):
        run(dit_program, traj, [{"pass": "cache", "config": {**config, "flops_budget": 0.9, "max_fd_shift": 0.5}}])
