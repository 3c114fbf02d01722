"""The search space (parsing, budget scaling) and the study (constraints, repeats, stale trials, resume)
without a model: the study's bookkeeping is checked with a scripted evaluation."""

import json
import os
import subprocess
import sys

import pytest
from optuna.trial import TrialState

from core.errors import ConfigError
from optimizer.targets import TARGETS_DIR, get_target, parse_target
from search import attribution, pareto
from search.space import parse_space
from search.study import METRICS, WORKER, evaluated, open_study, requeue_stale, run_trials

FRAGMENT = [{"pass": "recover", "config": {"steps": 600, "lr": 1e-4}}]
SPACE = {
    "trials": 4,
    "startup_trials": 2,
    "knobs": {
        "a": {"x": [], "y": FRAGMENT},
        "b": {"p": [], "q": [{"pass": "sampler", "config": {"sampling_steps": 10}}]},
    },
}


def test_a_space_scales_training_budgets_for_trials_only():
    space = parse_space(SPACE, "t")
    assert space.size == 4 and [k.name for k in space.knobs] == ["a", "b"]
    budgets = {"recover": frozenset({"steps"})}
    params = {"a": "y", "b": "q"}
    assert space.recipe(params, 0.25, budgets)[0]["config"] == {"steps": 150, "lr": 1e-4}
    assert space.recipe(params, 1.0, budgets)[0]["config"] == {"steps": 600, "lr": 1e-4}
    assert FRAGMENT[0]["config"]["steps"] == 600  # the target's data is never modified
    assert [s["pass"] for s in space.recipe(params)] == ["recover", "sampler"]
    assert space.describe(params) == "a=y, b=q"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"knobs": {}}, "at least one knob"),
        ({"knobs": {"a": {"x": [{"config": {}}]}}}, "must be a list of passes"),
        ({"knobs": {"a": {"x": []}}, "trials": 0}, "'trials' must be >= 1"),
        ({"knobs": {"a": {"x": []}}, "proxy_budget": 2}, "'proxy_budget' must be <= 1"),
        ({"knobs": {"a": {"x": []}}, "budget": 1}, "unknown search key"),
    ],
)
def test_a_bad_space_is_refused_with_one_line(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(data, "t")


def test_search_targets_have_an_empty_recipe_and_cpu_auto_is_one():
    data = {**json.loads((TARGETS_DIR / "cpu-auto.json").read_text())}
    assert get_target("cpu-auto").search is not None and get_target("cpu-auto").search.size == 36
    with pytest.raises(ConfigError, match="empty recipe"):
        parse_target({**data, "recipe": [{"pass": "sampler"}]}, "t")


def scripted(results):
    """An evaluation that returns canned metrics per recipe and counts its calls."""
    calls = []

    def evaluate(params):
        calls.append(dict(params))
        speed, fd = results[params["a"], params["b"]]
        constraints = {"max_fd_self_shift": fd - 8.0}
        return {
            "speedup": speed,
            "fd_self_shift": fd,
            "constraints": constraints,
            "feasible": constraints["max_fd_self_shift"] <= 0,
            "loop_ms": 10 / speed,
            "original_loop_ms": 10.0,
            "nfe": 4,
            "seconds": 0.0,
        }

    return evaluate, calls


RESULTS = {("x", "p"): (1.0, 0.0), ("x", "q"): (2.0, 3.0), ("y", "p"): (1.5, 5.0), ("y", "q"): (3.0, 9.0)}


def test_trials_record_metrics_and_constraints_and_never_evaluate_a_recipe_twice(tmp_path):
    space = parse_space({**SPACE, "trials": 10}, "t")  # more trials than recipes: each recipe once
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", space, seed=0)
    evaluate, calls = scripted(RESULTS)
    run_trials(study, space, evaluate, lambda _: None)
    assert sorted((c["a"], c["b"]) for c in calls) == sorted(RESULTS)  # all 4, none twice
    done = evaluated(study)
    assert len(done) == 4 and all(t.user_attrs["worker"] == WORKER for t in done)
    infeasible = next(t for t in done if t.params == {"a": "y", "b": "q"})
    assert infeasible.constraints == {"max_fd_self_shift": 1.0} and infeasible.user_attrs[METRICS]["feasible"] is False
    rows = [{"number": t.number, "params": t.params, "metrics": t.user_attrs[METRICS]} for t in done]
    front = {(rows[i]["params"]["a"], rows[i]["params"]["b"]) for i in pareto.front(rows)}
    assert front == {("x", "p"), ("x", "q"), ("y", "q")}  # (1.5x, FD 5) is beaten by (2x, FD 3)


def test_a_dead_workers_running_trial_is_queued_again_and_finished_ones_are_kept(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    space = parse_space(SPACE, "t")
    study = open_study(url, "s", space, seed=0)
    evaluate, _ = scripted(RESULTS)
    run_trials(study, parse_space({**SPACE, "trials": 1}, "t"), evaluate, lambda _: None)
    finished = evaluated(study)[0]
    # A trial a killed process left RUNNING: its recorded worker is a pid of this host that no longer exists.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = study.ask()
    stale.set_user_attr("worker", f"{WORKER.rpartition(':')[0]}:{int(dead.stdout)}")
    stale_params = {k.name: stale.suggest_categorical(k.name, list(k.choices)) for k in space.knobs}
    alive = study.ask()  # RUNNING in this (live) process: left alone
    alive.set_user_attr("worker", WORKER)
    lines = []
    assert requeue_stale(study, lines.append) == 1 and "queued again" in lines[0]
    resumed = open_study(url, "s", space, seed=0)
    evaluate, calls = scripted(RESULTS)
    run_trials(resumed, space, evaluate, lambda _: None)
    assert calls[0] == stale_params  # the unfinished candidate runs first
    assert (finished.params["a"], finished.params["b"]) not in {(c["a"], c["b"]) for c in calls}
    states = {t.number: t.state for t in resumed.get_trials(deepcopy=False)}
    assert states[stale.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    assert len(evaluated(resumed)) == 4 and evaluated(resumed)[0].number == finished.number
    assert os.getpid() == int(WORKER.rpartition(":")[2])


def test_each_pass_gets_its_share_of_the_log_speedup_and_of_the_fidelity_change():
    from types import SimpleNamespace

    from passes.manager import plan_passes, prefix_key

    planned = plan_passes(
        [{"pass": "sampler", "config": {"sampling_steps": 10}}, {"pass": "guidance", "config": {}}], frozenset({"fp32"})
    )
    programs = [object(), object()]
    loop_ms, fd = {id(programs[0]): 50.0, id(programs[1]): 25.0}, {id(programs[0]): 0.015, id(programs[1]): 0.02}
    runner = SimpleNamespace(
        cache={prefix_key(planned[: i + 1]): (p, None) for i, p in enumerate(programs)},
        time=lambda ps: [{"loop_ms": loop_ms[id(p)], "original_loop_ms": 100.0} for p in ps],
        proxy=SimpleNamespace(measure=lambda p: {"fd_self_shift": fd[id(p)]}),
    )
    rows = attribution.attribute(runner, planned)
    assert [r["pass"] for r in rows] == ["sampler", "guidance"]
    assert [r["speedup_so_far"] for r in rows] == [2.0, 4.0]
    assert [r["speed_share"] for r in rows] == pytest.approx([0.5, 0.5])  # 2x then 2x: half each
    assert [r["fidelity_share"] for r in rows] == pytest.approx([0.75, 0.25])  # shift 0 (the original) -> 0.015 -> 0.02
    assert "| sampler | 50.0 | 2.00x | 50% | 0.015 | +0.015 | 75% |" in "\n".join(attribution.markdown(rows))


def test_a_journal_file_storage_serves_like_sqlite(tmp_path):
    """--storage FILE.log: Optuna's journal storage, the one its docs advise for processes sharing a file."""
    space = parse_space(SPACE, "t")
    evaluate, calls = scripted(RESULTS)
    journal = str(tmp_path / "study.log")
    run_trials(open_study(journal, "s", space, seed=0), space, evaluate, lambda _: None)
    again = open_study(journal, "s", space, seed=1, worker=1)  # a second process opening the same study
    assert len(calls) == 4 and len(evaluated(again)) == 4
    run_trials(again, space, evaluate, lambda _: None)
    assert len(calls) == 4  # nothing left to evaluate


def test_the_targets_first_candidates_are_evaluated_before_tpe_proposes_any(tmp_path):
    space = parse_space({**SPACE, "trials": 2, "first": [{"a": "y", "b": "q"}, {"a": "x", "b": "q"}]}, "t")
    evaluate, calls = scripted(RESULTS)
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", space, seed=0)
    run_trials(study, space, evaluate, lambda _: None)
    assert calls == [{"a": "y", "b": "q"}, {"a": "x", "b": "q"}]
    open_study(f"sqlite:///{tmp_path / 's.db'}", "s", space, seed=0)  # reopened (resumed): not queued again
    assert len(study.get_trials(deepcopy=False)) == 2
    with pytest.raises(ConfigError, match="has no choice 'z'"):
        parse_space({**SPACE, "first": [{"a": "z", "b": "q"}]}, "t")
    with pytest.raises(ConfigError, match="one choice for every knob"):
        parse_space({**SPACE, "first": [{"a": "x"}]}, "t")


def test_a_knob_choice_that_changes_nothing_is_found():
    """A guidance policy after guidance distillation (no guidance left) leaves network and loop as they were:
    that candidate is a copy of another, and the trial runner refuses it as not applicable."""
    from types import SimpleNamespace

    from passes.manager import plan_passes, prefix_key
    from search.trials import idle_knobs

    space = parse_space(
        {
            "knobs": {
                "steps": {"20": [], "same": [{"pass": "sampler", "config": {}}]},
                "loop": {"none": [], "half": [{"pass": "guidance", "config": {"policy": "early", "fraction": 0.5}}]},
            }
        },
        "t",
    )
    params = {"steps": "same", "loop": "half"}
    planned = plan_passes(space.recipe(params, 1.0), frozenset({"fp32"}))
    start = SimpleNamespace(denoiser=object(), plan={"steps": 20, "guided": 20})
    same = SimpleNamespace(denoiser=start.denoiser, plan=dict(start.plan))  # a new program, equal contents
    half = SimpleNamespace(denoiser=start.denoiser, plan={"steps": 20, "guided": 10})
    cache = {prefix_key(planned[:1]): (same, None), prefix_key(planned[:2]): (half, None)}
    assert [q.name for q in planned] == ["sampler", "guidance"]
    assert idle_knobs(space, params, planned, start, cache) == ["steps=same"]
    cache[prefix_key(planned[:2])] = (same, None)
    assert idle_knobs(space, params, planned, start, cache) == ["steps=same", "loop=half"]
    assert idle_knobs(space, {"steps": "20", "loop": "none"}, [], start, {}) == []


def test_a_forged_trial_is_not_counted_as_evaluated():
    from search.study import valid_metrics

    good = {"feasible": True, "speedup": 2.0, "loop_ms": 5.0, "original_loop_ms": 10.0, "nfe": 4, "seconds": 3.0}
    assert valid_metrics({**good, "constraints": {"max_fd_self_shift": -0.1}})
    assert not valid_metrics({**good, "constraints": {"max_fd_self_shift": "low"}})
    assert not valid_metrics({**good, "speedup": "fast", "constraints": {}})
    assert not valid_metrics({**good, "speedup": float("nan"), "constraints": {}})
    assert not valid_metrics({**good, "feasible": "yes", "constraints": {}})
    assert not valid_metrics("metrics")


def test_a_lowering_that_failed_leaves_no_name_for_the_next_program_to_collide_with(tmp_path):
    """A trial found not applicable while lowering left its folder; the next program lowered (exit 3 before:
    FileExistsError on the same folder name) gets a folder of its own."""
    from types import SimpleNamespace

    from core.errors import ExportError
    from search.trials import TrialRunner

    class Backend:
        def __init__(self):
            self.attempts = []

        def lower(self, program, folder):
            self.attempts.append(folder)
            if program == "fails":
                raise ExportError("quantized layers not found in the exported graph")
            (folder / "plan.json").write_text("{}")

        def runner(self, folder):
            return folder

    backend = Backend()
    runner = SimpleNamespace(folder=tmp_path, _lowered={}, backend=backend)
    with pytest.raises(ExportError):
        TrialRunner._lower(runner, "fails")
    lowered = TrialRunner._lower(runner, "works")
    assert (lowered / "plan.json").is_file() and len(set(backend.attempts)) == 2
