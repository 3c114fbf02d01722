"""Atomic writes: outputs appear complete or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import ConfigError


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.
    Only a regular file is ever replaced (never a device node, folder or socket)."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} exists and is not a regular file; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    """Strict JSON: a NaN or Infinity anywhere is a bug upstream and raises instead of writing invalid JSON."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def require_regular_file(path: Path, what: str, error: type[Exception] = ConfigError) -> os.stat_result:
    """`path` is (or links to) a regular file: opening a FIFO would block, a device never ends."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: the {what} is not a regular file (a folder, FIFO or device)")
    return info


def is_plain_file(path: Path) -> bool:
    """A regular file itself, not a link to one (an artifact's files are read from inside its folder)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def recorded_file(folder: Path, name: Any, digest: Any, where: str, max_bytes: int | None = None) -> Path:
    """The file `name` of an artifact folder, checked against what the artifact recorded for it: a plain
    name inside the folder, a regular file and not a link, at most `max_bytes`, with the recorded sha256."""
    from core.errors import LoadError

    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise LoadError(f"{where}: {name!r} is not a file name inside the artifact folder")
    if not isinstance(digest, str):
        raise LoadError(f"{where}: {name} has no recorded sha256")
    path = folder / name
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise LoadError(f"{where}: {name} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise LoadError(f"{where}: {name} is a link or not a regular file; refusing to read it")
    if max_bytes is not None and info.st_size > max_bytes:
        raise LoadError(f"{where}: {name} is {info.st_size:,} bytes (at most {max_bytes:,})")
    if sha256_files([path]) != digest:
        raise LoadError(f"{where}: {name} does not match its recorded sha256; refusing to read it")
    return path


def sha256_files(paths: list[Path]) -> str:
    """Hex sha256 of the files' bytes in order, read in 1 MiB chunks."""
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
