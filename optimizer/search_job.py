"""The job for a target with a search space (`*-auto`): where the study lives, its worker processes,
and the finalists' lowering and verification into the staging folder.

The study is kept beside `--out` in `.<out>.search/study.sqlite3` until the output is published, so a
killed or interrupted search continues with `--resume`; `--storage URL` puts it elsewhere (shared by
processes on several machines: each runs `--trials-only`, one runs the job). A copy of the study goes
into the output folder as `search.sqlite3`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from core.ir import DiffusionProgram
from core.outputs import check_out_file
from passes.base import Context
from search import pareto
from search.driver import Outcome, search
from search.study import evaluated, open_study, requeue_stale, run_trials
from search.trials import TrialRunner
from verify.gates import GATES, evaluate_gates, passed

if TYPE_CHECKING:
    from optimizer.options import JobOptions, Loaded, Progress
    from optimizer.targets import Target

STUDY_FILE = "study.sqlite3"
COPY_FILE = "search.sqlite3"


def state_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.search"


def study_name(program: DiffusionProgram, target: Target, opts: JobOptions) -> str:
    """What the trials depend on: the model, the target's space and gates, the options that shape the loop."""
    what = {
        "model": program.source.digest,
        "target": [target.name, target.space_for(program)[1], target.gates, opts.gates, str(opts.judges)],
        "options": [opts.calibration_samples, opts.seed, opts.scheduler, opts.steps, opts.guidance, str(opts.prompts)],
    }
    return "search-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_storage(opts: JobOptions, out: Path | None, inputs: list[Path]) -> None:
    """Before any work: a --storage file is no input and a regular file of its kind; the local state
    beside --out is a folder of its own (not a link), and one that exists needs --resume or --overwrite."""
    from search.study import check_sqlite_state, check_storage_file, storage_file

    if opts.storage:
        local = storage_file(opts.storage)
        if local is not None:
            check_out_file(local[0], inputs, "--storage")
            check_storage_file(*local, opts.storage)
        return
    if out is None:
        return
    folder = state_dir(out)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ConfigError(f"{folder} (the search's state beside --out) is a link or not a folder; move it away")
    db = folder / STUDY_FILE
    if not (db.exists() or db.is_symlink()):
        return
    if db.is_symlink() or not db.is_file():
        raise ConfigError(f"{db} (the search's state) is a link or not a regular file; move it away")
    if not (opts.resume or opts.overwrite):
        raise ConfigError(
            f"an interrupted search for {out} is kept in {folder}: --resume continues it, --overwrite starts over"
        )
    if opts.resume:
        check_sqlite_state(db)


def storage_url(opts: JobOptions, out: Path, name: str, log: Callable[[str], None]) -> str:
    """The study's storage; the local one is checked against --resume / --overwrite."""
    if opts.storage:
        return opts.storage
    folder = state_dir(out)
    db = folder / STUDY_FILE
    if db.exists():
        if not opts.resume:  # check_storage refused it without --overwrite
            shutil.rmtree(folder)
        else:
            names = _study_names(db)
            if names and name not in names:
                raise ConfigError(
                    f"the search kept in {folder} was started with other options or another model; "
                    "rerun with the same ones, or --overwrite to start over"
                )
            log(f"resuming the search kept in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _study_names(db: Path) -> list[str]:
    import optuna

    return optuna.study.get_all_study_names(f"sqlite:///{db}")


def spawn_workers(model_path: Path, opts: JobOptions, url: str) -> list[Any]:
    """opts.workers - 1 more processes on this machine running trials of the same study."""
    context = multiprocessing.get_context("spawn")
    procs = []
    for index in range(1, opts.workers):
        worker_opts = dataclasses.replace(opts, storage=url, trials_only=True, workers=1)
        proc = context.Process(target=worker_main, args=(model_path, worker_opts, index, os.getpid()), daemon=False)
        proc.start()
        procs.append(proc)
    return procs


def worker_main(model_path: Path, opts: JobOptions, index: int, parent: int | None = None) -> None:
    """A spawned worker (--trials-only on the job's study): its own trials, its own log prefix; it dies
    with the job that spawned it (`parent`), even a SIGKILLed one."""
    import sys

    if parent is not None:
        die_with_parent(parent)

    from optimizer.targets import get_target

    def log(message: str) -> None:
        print(f"[optimize worker {index}] {message}", file=sys.stderr, flush=True)

    contribute_trials(model_path, get_target(opts.target), opts, lambda it, **_: it, log, index)


def contribute_trials(
    model_path: Path, target: Target, opts: JobOptions, progress: Progress, log: Callable[[str], None], index: int = 0
) -> int:
    """Trials of the shared study from the same program, calibration and proxies as every other process
    (deterministic); `index` tells workers' samplers apart. Returns the study's evaluated count."""
    from optimizer.prepare import load_checked, pass_context
    from optimizer.tasks import calibrate

    loaded = load_checked(model_path, target, opts)
    calibration = calibrate(loaded.program, opts, None, progress, loaded.given)
    ctx = pass_context(loaded.program, target, opts, calibration, progress, log)
    name = study_name(loaded.program, target, opts)
    return run_trials_only(loaded, target, opts, ctx, name, index, log)


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux PR_SET_PDEATHSIG); exit now if it already has."""
    import contextlib
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent-pid check below still runs
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(128 + signal.SIGTERM)


def run_trials_only(
    loaded: Loaded,
    target: Target,
    opts: JobOptions,
    ctx: Context,
    name: str,
    index: int,
    log: Callable[[str], None],
) -> int:
    """Trials of the shared study `name` until it holds enough; returns its evaluated count."""
    from backends.registry import get_backend

    space, _ = target.space_for(loaded.program)
    assert space is not None and opts.storage
    study = open_study(opts.storage, name, space, opts.seed, index)
    backend = get_backend(target.backend)
    runner = TrialRunner(loaded.program, ctx, space, loaded.gates.applicable, backend, log, loaded.judges)
    try:
        requeue_stale(study, log)
        run_trials(study, space, runner.evaluate, log)
    finally:
        runner.close()
    return len(evaluated(study))


def run_search_stage(
    model_path: Path,
    loaded: Loaded,
    target: Target,
    opts: JobOptions,
    ctx: Context,
    backend: Any,
    staging: Path,
    progress: Callable,
    log: Callable[[str], None],
) -> Outcome:
    """Trials, finalists (each lowered into staging/.finalist-k and verified), the chosen one's files
    moved up into `staging`; returns the outcome (its `verified`: (folder, files written, verification,
    reference images, candidate images))."""
    from optimizer.tasks import verify_lowered

    program, gates = loaded.program, loaded.gates.applicable
    space, _ = target.space_for(program)
    assert space is not None
    name = study_name(program, target, opts)
    url = storage_url(opts, opts.out, name, log)
    study = open_study(url, name, space, opts.seed)
    procs = spawn_workers(model_path, opts, url) if opts.workers > 1 else []
    if procs:
        log(f"{len(procs)} worker process(es) started beside this one")
    runner = TrialRunner(program, ctx, space, gates, backend, log, loaded.judges)
    finalist = itertools.count(1)

    def verify(candidate: DiffusionProgram) -> tuple[bool, Any]:
        folder = staging / f".finalist-{next(finalist)}"
        folder.mkdir()
        files = backend.lower(candidate, folder)
        lowered = backend.runner(folder)
        verification, ref_images, cand_images = verify_lowered(
            program, lowered, opts, progress, loaded.judges, loaded.gates
        )
        held = passed(evaluate_gates(loaded.gates, verification))
        return held, (folder, files, verification, ref_images, cand_images)

    def wait() -> None:
        for proc in procs:
            proc.join()
            if proc.exitcode:
                log(f"worker process {proc.pid} exited with {proc.exitcode}")

    try:
        outcome = search(runner, study, verify, log, wait)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
        runner.close()
    folder = outcome.verified[0]
    for path in folder.iterdir():
        path.replace(staging / path.name)
    for leftover in staging.glob(".finalist-*"):
        shutil.rmtree(leftover)
    rows = outcome.record["trials"]
    chosen = next(i for i, r in enumerate(rows) if r["number"] == outcome.record["chosen"]["trial"])
    metric = pareto.fidelity_axis(rows)[0]
    bound = next((b for g, b in gates.items() if GATES[g].metric == metric), None)
    pareto.plot(rows, chosen, staging / pareto.PLOT_FILE, bound)
    if url.startswith("sqlite:///"):
        _copy_sqlite(Path(url.removeprefix("sqlite:///")), staging / COPY_FILE)
    outcome.record["storage"] = url if opts.storage else f"{state_dir(opts.out)}/{STUDY_FILE} (copied to {COPY_FILE})"
    return outcome


def _copy_sqlite(source: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite database (the backup API, not a file copy)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def finish(opts: JobOptions) -> None:
    """After the output is published: the local study is in it, the state folder goes."""
    if not opts.storage:
        shutil.rmtree(state_dir(opts.out), ignore_errors=True)
