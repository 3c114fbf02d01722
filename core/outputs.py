"""Where outputs may go: never onto, into or over an input, never over something we did not create.

A job writes into a hidden staging folder beside `--out` named after this host and process, and renames
it into place when complete. Staging folders of processes that died (SIGKILL, power loss) are removed by
the next run into the same parent folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from core.checkpoint import WEIGHT_SUFFIXES, sidecar_path
from core.errors import ConfigError, OptimizerError, one_line
from core.fileio import umask
from core.validate import read_json_object

PLAN_FILE = "plan.json"  # every published artifact has one; backends write it
PLAN_FORMAT = "diffusion-plan"
ERROR_LOG = "error.log"
STALE_AFTER_S = 7 * 24 * 3600  # staging of another host (or of a reused pid) is stale after a week
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"^\..+\.(staging|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]+$")


def resolve(path: Path, what: str) -> Path:
    """The absolute, symlink-free path; a symlink loop is bad input, not a traceback."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop (Python < 3.13)
        raise ConfigError(f"{what} {path}: cannot be resolved ({one_line(str(exc))})") from None


def input_paths(model: Path) -> list[Path]:
    """Every path a job reads for `model`: the file, its sidecar or weights, or the whole folder."""
    paths = [model]
    if model.suffix == ".json":
        paths += [model.with_suffix(s) for s in WEIGHT_SUFFIXES]
    elif not model.is_dir():
        paths.append(sidecar_path(model))
    return paths


def _clashes(out: Path, inputs: Iterable[Path]) -> Path | None:
    """The first input that `out` is, contains, or lies inside of (for input folders)."""
    for given in inputs:
        path = resolve(given, "input")
        if out == path or out in path.parents or (path.is_dir() and path in out.parents):
            return given
    return None


def is_optimize_output(folder: Path) -> bool:
    """A folder `optimize` published: it holds our plan.json."""
    try:
        return read_json_object(folder / PLAN_FILE).get("format") == PLAN_FORMAT
    except OptimizerError:
        return False


def check_out_dir(out: Path, inputs: Iterable[Path], overwrite: bool) -> Path:
    """Resolve `--out` and refuse anything but a new folder, an empty one, or (with --overwrite) an
    earlier output of ours that holds none of the inputs."""
    resolved = resolve(out, "--out")
    clash = _clashes(resolved, inputs)
    if clash is not None:
        raise ConfigError(f"--out {out} would write onto, into or over the input {clash}; choose another folder")
    if resolved.exists() or resolved.is_symlink():
        if not resolved.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder; refusing to replace it")
        if any(resolved.iterdir()):
            if not overwrite:
                raise ConfigError(f"--out {out} exists and is not empty (use --overwrite to replace it)")
            if not is_optimize_output(resolved):
                raise ConfigError(
                    f"--out {out} is not an `optimize` output folder (no {PLAN_FILE} of ours); "
                    "--overwrite replaces only those"
                )
    _check_writable_parent(resolved, "--out")
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


def clean_stale(parent: Path, log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Remove staging/old folders left by dead processes of this host, or older than a week."""
    removed = []
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
        if (ours and pid != os.getpid() and not _alive(pid)) or (old and not (ours and pid == os.getpid())):
            shutil.rmtree(entry, ignore_errors=True)
            log(f"removed {entry.name}, left by an interrupted run (pid {pid})")
            removed.append(entry)
    return removed


def create_staging(out: Path, log: Callable[[str], None] = lambda _: None) -> Path:
    """A fresh hidden folder beside `out` (resolved), after removing stale ones there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, log)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{_HOST}-{os.getpid()}-", dir=out.parent))


def publish(staging: Path, out: Path) -> None:
    """Swap the finished staging folder into place; an old `out` (checked to be ours) goes only afterwards."""
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
