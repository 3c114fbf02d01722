"""Where outputs may go: never onto, into or over an input, never over something we did not create.

A job claims `--out` first (an exclusive lock beside it, so a second job on the same `--out` is refused,
and a record of what was there), writes into a hidden staging folder beside it named after this host and
process, and renames it into place when complete, only if `--out` is still what the claim recorded.
Staging folders of processes that died (SIGKILL, power loss) are removed by the next run into the same
parent folder; their locks die with them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.checkpoint import WEIGHT_SUFFIXES, sidecar_path
from core.errors import ConfigError, OptimizerError, one_line
from core.fileio import is_plain_file, umask
from core.validate import read_json_object

PLAN_FILE = "plan.json"  # every published artifact has one; backends write it
PLAN_FORMAT = "diffusion-plan"
PLAN_VERSIONS = (1, 2)  # backends.plan reads these
ERROR_LOG = "error.log"
STALE_AFTER_S = 7 * 24 * 3600  # staging of another host (or of a reused pid) is stale after a week
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(staging|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]+$")


def resolve(path: Path, what: str) -> Path:
    """The absolute, symlink-free path; a symlink loop is bad input, not a traceback."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop (Python < 3.13)
        raise ConfigError(f"{what} {path}: cannot be resolved ({one_line(str(exc))})") from None


MAX_FOLDER_ENTRIES = 10_000  # entries of an input folder resolved one by one (a pipeline has a handful)


def input_paths(model: Path) -> list[Path]:
    """Every path a job reads for `model`: the file, its sidecar or weights, or the whole folder and
    each of its entries (a component folder that is a link resolves elsewhere)."""
    paths = [model]
    if model.suffix == ".json":
        paths += [model.with_suffix(s) for s in WEIGHT_SUFFIXES]
    elif model.is_dir():
        try:
            entries = [entry for _, entry in zip(range(MAX_FOLDER_ENTRIES + 1), model.iterdir(), strict=False)]
        except OSError as exc:
            raise ConfigError(f"{model}: cannot list the folder ({one_line(exc)})") from None
        if len(entries) > MAX_FOLDER_ENTRIES:
            raise ConfigError(f"{model}: more than {MAX_FOLDER_ENTRIES:,} entries; is this a model folder?")
        paths += entries
    else:
        paths.append(sidecar_path(model))
    return paths


def _clashes(out: Path, inputs: Iterable[Path]) -> Path | None:
    """The first input that `out` is, contains, or lies inside of (for input folders)."""
    for given in inputs:
        path = resolve(given, "input")
        if out == path or out in path.parents or (path.is_dir() and path in out.parents):
            return given
    return None


def not_ours(folder: Path, own: Iterable[str], side_suffixes: Iterable[str] = ()) -> str | None:
    """Why `folder` is not an output `optimize` published, or None when it is: a complete plan.json of
    ours (format, version, the graphs it records), and nothing in the folder but the files the plan
    records (graphs, their weights and `side_suffixes` files, tokenizer folders of plain files) and the
    `own` names a job writes beside them (reports, grid, calibration)."""
    try:
        if (folder / PLAN_FILE).is_symlink():
            raise OptimizerError("a symlink")
        names = _plan_names(read_json_object(folder / PLAN_FILE), tuple(side_suffixes))
    except (OptimizerError, OSError, KeyError, TypeError, AttributeError) as exc:
        return f"no complete {PLAN_FILE} of ours ({one_line(exc, 80)})"
    files, folders = names
    files |= set(own) | {PLAN_FILE}
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name in folders and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir()) if not is_plain_file(e)]
        elif entry.name not in files or not is_plain_file(entry):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return f"it holds {', '.join(foreign[:3])}{more}, which optimize never writes"
    return None


def _plan_names(doc: dict, side_suffixes: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """The files and tokenizer folders plan.json records (KeyError/TypeError when it is not complete)."""
    if doc.get("format") != PLAN_FORMAT or doc.get("version") not in PLAN_VERSIONS:
        raise OptimizerError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
    graphs = list(doc["graphs"].values())
    if not graphs:
        raise OptimizerError("no graphs")
    stages = doc.get("stages") or {}
    graphs += [stages[k] for k in ("prompt_encoder", "decoder") if k in stages]
    files, folders = set(), set()
    for graph in graphs:
        for entry in (graph, graph.get("data")):
            if entry is None:
                continue
            name, digest = entry["file"], entry["sha256"]
            if not isinstance(name, str) or Path(name).name != name or not isinstance(digest, str) or len(digest) != 64:
                raise OptimizerError(f"a graph entry {name!r}")
            files |= {name, *(str(Path(name).with_suffix(s)) for s in side_suffixes)}
    files |= set(doc.get("files", {}))  # what backends.plan.record_files added (only matched against entries)
    for tokenizer in stages.get("prompt_encoder", {}).get("tokenizers", []):
        name = tokenizer["folder"]
        if not isinstance(name, str) or Path(name).name != name:
            raise OptimizerError(f"a tokenizer folder {name!r}")
        folders.add(name)
    return files, folders


def check_out_dir(
    out: Path,
    inputs: Iterable[Path],
    overwrite: bool,
    own: Iterable[str] = (),
    side_suffixes: Iterable[str] = (),
    flag: str = "--out",
) -> Path:
    """Resolve `--out` and refuse anything but a new folder, an empty one, or (with --overwrite) an
    earlier output of ours (not_ours) that holds none of the inputs."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(out)):
        raise ConfigError(f"{flag} {str(out)!r}: a path with a newline or control character; choose another")
    resolved = resolve(out, flag)
    clash = _clashes(resolved, inputs)
    if clash is not None:
        raise ConfigError(f"{flag} {out} would write onto, into or over the input {clash}; choose another folder")
    if resolved.is_dir() and os.path.ismount(resolved):
        raise ConfigError(f"{flag} {out} is a mount point; the output is renamed into place, so choose a folder in it")
    if resolved.exists() or resolved.is_symlink():
        if not resolved.is_dir():
            raise ConfigError(f"{flag} {out} exists and is not a folder; refusing to replace it")
        if any(resolved.iterdir()):
            if not overwrite:
                raise ConfigError(f"{flag} {out} exists and is not empty (use --overwrite to replace it)")
            why = not_ours(resolved, own, side_suffixes)
            if why is not None:
                raise ConfigError(
                    f"{flag} {out} is not an `optimize` output folder: {why}; --overwrite replaces only those"
                )
    _check_writable_parent(resolved, flag)
    return resolved


def check_out_file(out: Path, inputs: Iterable[Path], flag: str = "--out") -> Path:
    """Resolve an output file and refuse an input, a path inside an input folder, or a non-regular file."""
    resolved = resolve(out, flag)
    clash = _clashes(resolved, inputs)
    if clash is not None:
        raise ConfigError(f"{flag} {out} would write onto, into or over the input {clash}; choose another path")
    if resolved.exists() and not resolved.is_file():
        raise ConfigError(f"{flag} {out} exists and is not a regular file; refusing to replace it")
    _check_writable_parent(resolved, flag)
    return resolved


def _check_writable_parent(resolved: Path, flag: str) -> None:
    parent = next((p for p in resolved.parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ConfigError(f"{flag} {resolved}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {resolved}: cannot write in {parent} (permission denied)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(parent: Path, log: Callable[[str], None] = lambda _: None, out_name: str | None = None) -> list[Path]:
    """Remove staging/old folders left by dead processes of this host, or older than a week. A failed run's
    folder holding only its error log (the path its exit-3 message names) is kept for a week, unless it
    was a run into the same `out_name` (runs into siblings of one parent never delete each other's logs)."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match["pid"])
        ours = match["host"] == _HOST
        try:
            old = now - entry.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        keep_log = not old and match["name"] != out_name and (entry / ERROR_LOG).is_file()
        if keep_log:
            continue
        if (ours and pid != os.getpid() and not _alive(pid)) or (old and not (ours and pid == os.getpid())):
            shutil.rmtree(entry, ignore_errors=True)
            log(f"removed {entry.name}, left by an interrupted run (pid {pid})")
            removed.append(entry)
    return removed


def create_staging(out: Path, log: Callable[[str], None] = lambda _: None) -> Path:
    """A fresh hidden folder beside `out` (resolved), after removing stale ones there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, log, out.name)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{_HOST}-{os.getpid()}-", dir=out.parent))


@dataclass(frozen=True)
class Claim:
    """`--out` held by this job: the lock file's descriptor, and what was at `--out` when it was taken."""

    out: Path
    lock: Path
    fd: int
    state: tuple | None


@contextlib.contextmanager
def claim(out: Path) -> Iterator[Claim]:
    """Lock `out` (resolved) for this job until it ends: a second job on the same `--out` is refused
    (exit 2) before any work. The lock is the kernel's (flock), so it dies with its process."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    fd = _lock(lock, out)
    try:
        yield Claim(out, lock, fd, _state(out))
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _lock(lock: Path, out: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"--out {out}: another optimize run (pid {holder}) is writing it; wait for it or choose another folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its last holder unlinked between our open and our flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _state(out: Path) -> tuple | None:
    """What is at `out`: its identity and, for a folder, each entry's name, kind, size and mtime."""
    try:
        st = out.lstat()
    except FileNotFoundError:
        return None
    entries: tuple[tuple[str, int, int, int], ...] = ()
    if out.is_dir() and not out.is_symlink():
        entries = tuple(sorted((e.name, *_stamp(e)) for e in out.iterdir()))
    return (st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, entries)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return (st.st_mode, st.st_size, st.st_mtime_ns)


def publish(staging: Path, held: Claim) -> None:
    """Swap the finished staging folder into place if `--out` is still what the claim found (nothing, an
    empty folder, or the earlier output --overwrite replaces, which goes only afterwards). When something
    else is there now, nothing is replaced: the result is kept beside it and the job says where (exit 2)."""
    out = held.out
    if _state(out) != held.state:
        kept = out.with_name(f"{out.name}.unpublished-{os.getpid()}")
        staging.rename(kept)
        raise ConfigError(
            f"--out {out} changed during the run (something else was written there); it was left as it is and "
            f"the result is in {kept}"
        )
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{_HOST}-{os.getpid()}-{staging.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    staging.chmod(0o777 & ~umask())
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)


def keep_error_log(staging: Path, exc: BaseException) -> Path:
    """Empty the staging folder but for a traceback of `exc`; the next run into this parent removes it.
    If even that cannot be written (disk full), the staging folder goes and the log lands in the temp folder."""
    try:
        for entry in staging.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        log = staging / ERROR_LOG
        log.write_text(_traceback(exc))
        return log
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return write_error_log(exc)


def write_error_log(exc: BaseException) -> Path:
    """A traceback in the temporary folder, for failures outside a job's staging folder."""
    fd, name = tempfile.mkstemp(prefix=f"optimize-error-{os.getpid()}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(_traceback(exc))
    return Path(name)


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
