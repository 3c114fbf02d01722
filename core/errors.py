"""Errors and the exit codes they map to. Each code means one thing, so CI can tell them apart:

0 every gate passed; 1 a quality gate failed; 2 bad input or an environment problem the user can fix
(unreadable/unwritable path, disk full, too large for this machine); 3 an internal error (a bug: one
line on stderr, the traceback in a log file); 128 + N interrupted by signal N (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import errno
from pathlib import Path

EXIT_PASS = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_SIGNAL_BASE = 128


# OS errors the user fixes on their side (space, permissions, read-only mounts, path limits): exit 2.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EMFILE,
        errno.ENFILE,
    }
)


def one_line(message: object, limit: int | None = None) -> str:
    """`message` (text or an exception) on one line, cut to `limit` characters; an exception with no
    message gives its type name."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text[:limit] if limit else text


def is_environment_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS


def describe_environment_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


class OptimizerError(Exception):
    """Base class for errors caused by the user's input or configuration."""


class LoadError(OptimizerError):
    """The model could not be loaded (missing, corrupt, unsafe or unsupported)."""


class ConfigError(OptimizerError):
    """A target, recipe, pass config or CLI option is invalid."""


class ExportError(OptimizerError):
    """Lowering to a backend failed or produced a graph we refuse to ship."""


class LimitError(OptimizerError):
    """The run would need more memory or time than allowed (override with --allow-large)."""


class InternalError(Exception):
    """A bug surfaced during a job; the traceback was written to `log`."""

    def __init__(self, cause: BaseException, log: Path) -> None:
        super().__init__(f"{type(cause).__name__}: {one_line(str(cause))}")
        self.log = log


class Interrupted(BaseException):
    """A termination signal arrived (raised from the signal handler, so cleanup runs as for Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
