"""`optimize MODEL --target <search target>`: trials, finalists, the report's search sections, the study
file, worker processes sharing one study, and a killed search resumed without redoing finished trials.

The model is a tiny untrained DiT and the gates are wide: these tests check the search's mechanics and
bookkeeping; the search's results on the trained models are benchmark runs (BENCHMARKS.md)."""

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState
from PIL import Image

from optimizer.cli import main

STEPS = {
    "20 x CFG": [],
    "10 x CFG": [{"pass": "sampler", "config": {"sampling_steps": 10}}],
    "5 x CFG": [{"pass": "sampler", "config": {"sampling_steps": 5}}],
}
LOOP = {
    "none": [],
    "half guided": [{"pass": "guidance", "config": {"policy": "early", "fraction": 0.5}}],
    "quarter guided": [{"pass": "guidance", "config": {"policy": "early", "fraction": 0.25}}],
}
FAST = ["--samples", "8", "--calibration-samples", "2", "--latency-repeats", "0", "--seed-sets", "1"]


def search_target(folder: Path, trials: int, repeats: int = 2, proxy_samples: int = 8) -> Path:
    data = {
        "name": "tiny-auto",
        "status": "available",
        "description": "a test search",
        "hardware": {"device": "cpu", "capabilities": ["fp32"]},
        "backend": {"name": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        "recipe": [],
        "search": {
            "trials": trials,
            "startup_trials": 2,
            "finalists": 1,
            "proxy_samples": proxy_samples,
            "latency_repeats": repeats,
            "knobs": {"steps": STEPS, "loop": LOOP},
        },
        "gates": {"max_class_agreement_drop": 1.0, "max_fd_self_shift": 1e9},
    }
    path = folder / "tiny-auto.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tiny_model(tmp_path, tiny_digits_dit):
    """The tiny digits DiT (conftest) in a folder of this test's own."""
    folder = tmp_path / "model"
    folder.mkdir()
    for src in (tiny_digits_dit, tiny_digits_dit.with_suffix(".json")):
        shutil.copy(src, folder / src.name)
    return folder / tiny_digits_dit.name


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _schema_ready(db: Path) -> bool:
    """Whether the search has finished creating the study's database (read-only). An Optuna storage opened
    before that creates the schema too, racing the search's own: the search then failed with "table
    alembic_version already exists"."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def _evaluated(db: Path, *also: TrialState) -> list:
    """The study's evaluated trials (and those in the states `also`), repeats left out."""
    if not _schema_ready(db):  # also False while the file does not exist
        return []
    try:
        names = optuna.study.get_all_study_names(f"sqlite:///{db}")
        if not names:
            return []
        study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{db}")
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, *also))
    except Exception:  # the database is being created by the other process
        return []
    return [t for t in trials if "repeat_of" not in t.user_attrs]


def test_two_workers_share_a_study_and_a_killed_search_resumes_without_redoing_finished_trials(tmp_path, tiny_model):
    """--workers 2, killed (SIGKILL) once both processes hold trials of the study (one finished at least, the
    other's perhaps still running); refused without --resume; resumed in this process: the finished trials kept
    as measured, the killed running one and the missing ones evaluated, then finalists, the report, the Pareto
    plot and the study file as any search writes them."""
    # Trials long enough (24 proxy samples) that the spawned worker, which imports and loads before its first
    # trial, takes one before the first process has run them all, on an idle machine too.
    trials = 8
    target, out = search_target(tmp_path, trials=trials, repeats=4, proxy_samples=24), tmp_path / "out"
    db = tmp_path / ".out.search" / "study.sqlite3"
    optimize = Path(sys.executable).parent / "optimize"
    args = [optimize, tiny_model, "--target", target, "--out", out, "--workers", "2", *FAST]
    log = tmp_path / "search.log"
    with log.open("w") as stderr:  # a file, not a pipe nobody reads: the search never blocks on its log
        proc = subprocess.Popen([str(a) for a in args], stderr=stderr, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            taken = _evaluated(db, TrialState.RUNNING)
            if len({t.user_attrs.get("worker") for t in taken} - {None}) >= 2 and _evaluated(db):
                break
            time.sleep(0.2)
    finally:
        ended = proc.poll()
        with contextlib.suppress(ProcessLookupError):  # the workers too (its process group)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ended is None, f"the search ended (exit {ended}) before it was killed:\n{log.read_text()[-3000:]}"
    before = {t.number: t.user_attrs["metrics"] for t in _evaluated(db)}
    workers = {t.user_attrs.get("worker") for t in _evaluated(db, TrialState.RUNNING)} - {None}
    assert len(workers) == 2, f"the second process took no trial before the first finished the study: {workers}"
    assert 1 <= len(before) < trials and not out.exists()

    refused = invoke(tiny_model, "--target", target, "--out", out, *FAST)
    assert refused.exit_code == 2 and "--resume" in refused.output

    resumed = invoke(tiny_model, "--target", target, "--out", out, "--resume", *FAST)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming: {len(before)} evaluated trial(s) kept, not redone" in resumed.output
    search = json.loads((out / "report.json").read_text())["search"]
    rows = {r["number"]: r for r in search["trials"]}
    assert len(rows) == trials and search["kept_from_earlier_runs"] == len(before)
    for number, metrics in before.items():  # kept as measured, by the processes that measured them
        assert rows[number]["metrics"] == metrics and rows[number]["worker"] in workers
    mine = [r for r in rows.values() if r["worker"].endswith(f":{os.getpid()}")]
    assert len(mine) == trials - len(before)  # the resumed run evaluated only what was missing
    finished_before = {r["worker"] for r in rows.values() if r["number"] in before}
    assert set(search["workers"]) == finished_before | {r["worker"] for r in mine}
    assert not list(tmp_path.glob(".out.staging-*")) and not (tmp_path / ".out.search").exists()
    assert resumed.output.count("] trial ") >= 2 * len(mine)  # a start and a result line per trial (CI logs)
    check_search_output(out, search, tiny_model)


def check_search_output(out, search, model):
    """The fastest candidate that met the gates was kept, and the output says everything about the search."""
    rows = search["trials"]
    assert len({json.dumps(r["params"], sort_keys=True) for r in rows}) == len(rows)
    fastest = max((r for r in rows if r["metrics"]["feasible"]), key=lambda r: r["metrics"]["speedup"])
    assert search["chosen"]["trial"] == fastest["number"] and search["finalists"][0]["passed"]
    chosen = search["chosen"]["recipe"]
    assert chosen == [*STEPS[fastest["params"]["steps"]], *LOOP[fastest["params"]["loop"]]]
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["steps"]) == {"20 x CFG": 20, "10 x CFG": 10, "5 x CFG": 5}[fastest["params"]["steps"]]
    shares = search["attribution"]
    assert [r["pass"] for r in shares] == [s["pass"] for s in chosen]
    if shares:
        assert sum(r["speed_share"] for r in shares) == pytest.approx(1.0)
    assert search["pareto_front"] and set(search["pareto_front"]) <= {r["number"] for r in rows}
    assert Image.open(out / "pareto.png").format == "PNG"
    study = optuna.load_study(study_name=search["study"], storage=f"sqlite:///{out / 'search.sqlite3'}")
    evaluated = [t for t in study.trials if t.state == TrialState.COMPLETE and "repeat_of" not in t.user_attrs]
    assert len(evaluated) == len(rows)
    text = (out / "report.md").read_text()
    for heading in ("## Search", "### Candidates", "![Pareto front](pareto.png)", "### Finalists", "### Each pass"):
        assert heading in text

    # `optimize bench` times any output folder against the original (torch, and its fp32 graph), each on the
    # original's own loop as the report times them: the table the report shows, the JSON behind --json-out.
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "plan.json").read_text())["model"]["original_sampling"] == report["plan"]
    timings_file = out.parent / "bench.json"
    bench = invoke("bench", out, "--model", model, "--repeats", 1, "--images", 2, "--json-out", timings_file)
    assert bench.exit_code == 0, bench.output
    assert "| original, ONNX Runtime fp32 |" in bench.output and "| artifact, ONNX Runtime |" in bench.output
    assert "speedup vs original, ONNX Runtime fp32" in bench.output
    timings = json.loads(timings_file.read_text())
    assert timings["images"] == 2 and timings["batch"] == 4
    assert all(timings[f"{k}_per_step_ms"] > 0 for k in ("torch", "ort", "ort_fp32"))
