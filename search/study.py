"""The search engine: an Optuna study (TPE with the gates as constraints, speed as the objective) in
storage that survives the process, so a killed search resumes and several processes share one.

- Every trial records the worker that ran it (host:pid). A trial left RUNNING by a dead process of this
  host is failed and its candidate queued again; finished trials are never redone.
- TPE proposes a candidate already evaluated now and then; it gets the recorded result at no cost
  (`repeat_of`) and does not count as an evaluated trial.
- A study is named after what it searches (model digest, target, options), so a shared storage
  (`--storage URL`: SQLite, PostgreSQL/MySQL, or an Optuna journal file) can hold several.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from core.errors import ConfigError, OptimizerError, one_line
from search.space import SearchSpace

WORKER = f"{socket.gethostname()}:{os.getpid()}"
METRICS = "metrics"  # user attribute holding a trial's measured dict


JOURNAL_SUFFIXES = (".log", ".journal")
SERVER_SCHEMES = ("postgresql", "mysql")
SQLITE_HEADER = b"SQLite format 3\x00"
MAX_JOURNAL_BYTES = 1 << 30  # a study of thousands of trials is a few MB


def storage_file(url: str) -> tuple[Path, str] | None:
    """The local file a --storage URL names and its kind ("journal" or "sqlite"), None for a database
    server's URL. Refused (one line): an unknown scheme, a server URL whose driver is not installed."""
    if "://" not in url:
        if not url.endswith(JOURNAL_SUFFIXES):
            raise ConfigError(f"--storage {url}: a journal file ends in .log or .journal, or give a URL")
        return Path(url), "journal"
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")), "sqlite"
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme not in SERVER_SCHEMES:
        known = "sqlite:///FILE, postgresql://, mysql://, FILE.log"
        raise ConfigError(f"--storage: unknown scheme {scheme!r} (known: {known})")
    try:
        import sqlalchemy

        sqlalchemy.create_engine(url)  # imports the driver; connects only when used
    except Exception as exc:  # sqlalchemy raises several kinds for a bad URL or a missing driver
        raise ConfigError(f"--storage: {scheme} cannot be used here ({one_line(exc, 160)})") from None
    return None


def check_storage_file(path: Path, kind: str, url: str) -> None:
    """A storage file's folder exists; an existing file is a regular file and a journal, or an SQLite
    study as check_sqlite_state reads it."""
    if not path.parent.is_dir():
        raise ConfigError(f"--storage {url}: the folder {path.parent} does not exist")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ConfigError(f"--storage {url}: {path} is a link or not a regular file")
    if not (path.exists() and path.stat().st_size):
        return
    if kind == "sqlite":
        check_sqlite_state(path, "choose another --storage file")
        return
    with path.open("rb") as f:
        head = f.read(1)
    if head != b"{" or path.stat().st_size > MAX_JOURNAL_BYTES:
        raise ConfigError(f"--storage {url}: {path} is not an Optuna journal (or over 1 GiB)")


MAX_UNFINISHED = 10_000  # RUNNING trials a resumed study may hold (a few per worker are real)


def check_sqlite_state(db: Path, advice: str = "--overwrite starts over") -> None:
    """An SQLite study file a search resumes, read-only: a database, intact, with no triggers or views
    (SQL that would run on our writes), a schema this Optuna knows, and a bounded number of unfinished
    trials (a million made --resume spin for minutes). `advice` ends each refusal."""
    import sqlite3

    with db.open("rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise ConfigError(f"{db} is not an SQLite database; {advice}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            if con.execute("PRAGMA quick_check").fetchone() != ("ok",):
                raise ConfigError(f"{db} is damaged (SQLite's quick_check failed); {advice}")
            kinds = {k for (k,) in con.execute("SELECT type FROM sqlite_master WHERE type IN ('trigger', 'view')")}
            if kinds:
                raise ConfigError(f"{db} holds {' and '.join(sorted(kinds))}s, which a study never has; {advice}")
            (version,) = con.execute("SELECT version_num FROM alembic_version").fetchone() or ("?",)
            if version not in _schema_versions():
                raise ConfigError(f"{db}: study schema {version!r} is unknown to this Optuna; {advice}")
            (running,) = con.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()
    except sqlite3.Error as exc:
        raise ConfigError(f"{db} is not a readable study ({one_line(exc, 120)}); {advice}") from None
    if running > MAX_UNFINISHED:
        raise ConfigError(f"{db} holds {running:,} unfinished trials (at most {MAX_UNFINISHED:,}); {advice}")


@functools.cache
def _schema_versions() -> frozenset[str]:
    """The study schema revisions this Optuna's migrations know (alembic's version_num)."""
    folder = Path(optuna.__file__).parent / "storages" / "_rdb" / "alembic" / "versions"
    found = (re.search(r'^revision = "([^"]+)"', p.read_text(), re.M) for p in folder.glob("*.py"))
    return frozenset(m[1] for m in found if m)


def valid_metrics(metrics: Any) -> bool:
    """A trial's recorded metrics as run_trials writes them (a forged trial's are not evaluated)."""
    if not isinstance(metrics, dict) or not isinstance(metrics.get("feasible"), bool):
        return False
    numbers = [metrics.get(k) for k in ("speedup", "loop_ms", "original_loop_ms", "nfe", "seconds")]
    constraints = metrics.get("constraints")
    if not isinstance(constraints, dict):
        return False
    numbers += list(constraints.values())
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)


def storage(url: str) -> optuna.storages.BaseStorage | str:
    """An Optuna storage URL, or a journal file (a path ending in .log / .journal)."""
    if url.endswith((".log", ".journal")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:"):  # worker processes write to one file: wait for its lock, do not fail
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return url


def open_study(url: str, name: str, space: SearchSpace, seed: int, worker: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(
        seed=seed + worker,  # workers sharing a study must not propose the same random candidates
        n_startup_trials=space.startup_trials,
    )
    study = optuna.create_study(
        storage=storage(url), study_name=name, sampler=sampler, direction="maximize", load_if_exists=True
    )
    if worker == 0 and not study.get_trials(deepcopy=False):  # a new study: the target's first candidates
        for params in space.first:
            study.enqueue_trial(params)
    return study


def evaluated(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials that were evaluated (not repeats), in order."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "repeat_of" not in t.user_attrs and valid_metrics(t.user_attrs.get(METRICS))
    ]


def requeue_stale(study: optuna.Study, log: Callable[[str], None]) -> int:
    """Fail the RUNNING trials of dead processes on this host and queue their candidates again."""
    host = socket.gethostname()
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker", "")
        who, _, pid = owner.rpartition(":")
        if who != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another process failed it first and queued it again
            continue
        if t.params:
            study.enqueue_trial(t.params)
        log(f"trial {t.number} was left unfinished by process {pid}: queued again")
        count += 1
    return count


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_trials(
    study: optuna.Study,
    space: SearchSpace,
    evaluate: Callable[[dict[str, str]], dict[str, Any]],
    log: Callable[[str], None],
) -> None:
    """Evaluate candidates until the study holds `space.trials` evaluated ones (all workers together) or
    every candidate of the space has been evaluated."""
    wanted = min(space.trials, space.size)
    for _ in range(20 * space.trials):
        done = evaluated(study)
        if len(done) >= wanted:
            break
        trial = study.ask()
        trial.set_user_attr("worker", WORKER)
        params = {k.name: trial.suggest_categorical(k.name, list(k.choices)) for k in space.knobs}
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if "error" in t.user_attrs]
        if any(t.params == params for t in failed):  # known not to apply: no second attempt
            study.tell(trial, state=TrialState.FAIL)
            continue
        seen = next((t for t in done if t.params == params), None)
        if seen is not None:
            trial.set_user_attr("repeat_of", seen.number)
            trial.set_user_attr(METRICS, seen.user_attrs[METRICS])
            _constrain(trial, seen.user_attrs[METRICS]["constraints"])
            study.tell(trial, seen.value)
            continue
        log(f"trial {trial.number} ({len(done) + 1}/{wanted}): {space.describe(params)}")
        try:
            metrics = evaluate(params)
        except OptimizerError as exc:  # this candidate does not apply to the model: recorded, search goes on
            trial.set_user_attr("error", one_line(str(exc)))
            study.tell(trial, state=TrialState.FAIL)
            log(f"trial {trial.number}: not applicable ({one_line(str(exc))})")
            continue
        except BaseException:  # interrupted (or a bug): a resumed search evaluates this candidate first
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(params)
            raise
        trial.set_user_attr(METRICS, metrics)
        _constrain(trial, metrics["constraints"])
        study.tell(trial, metrics["speedup"])
        log(f"trial {trial.number}: {summary(metrics)}")


def _constrain(trial: optuna.Trial, constraints: dict[str, float]) -> None:
    """TPE's constraints, one per gate: <= 0 meets it."""
    for gate, value in constraints.items():
        trial.set_constraint(gate, value)


def summary(m: dict[str, Any]) -> str:
    """One progress line per trial (a CI log shows every trial)."""
    parts = [f"{m['speedup']:.2f}x ({m['loop_ms']:.1f} ms vs {m['original_loop_ms']:.1f} ms)", f"NFE {m['nfe']}"]
    if m.get("psnr_db_mean") is not None:
        parts.append(f"PSNR {m['psnr_db_mean']:.1f} dB")
    if m.get("fd_self_shift") is not None:
        parts.append(f"distribution shift {m['fd_self_shift']:.3g}")
    if m.get("class_agreement_drop") is not None:
        parts.append(f"agreement drop {m['class_agreement_drop']:.2f}")
    parts.append("feasible" if m["feasible"] else "infeasible")
    return ", ".join(parts) + f" [{m['seconds']:.0f} s]"
