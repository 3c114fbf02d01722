"""Progress that shows in a CI log as well as a terminal.

On a terminal: tqdm bars. Otherwise (a CI log, a pipe): a line when a loop starts, about every
`LOG_EVERY_S` seconds while it runs, and when it ends, with its count and duration; `timed` wraps a
stage in start/end lines with its duration.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
LOG_EVERY_S = 30.0


def interactive() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def timed(log: Callable[[str], None], what: str) -> Iterator[None]:
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    log(f"{what}: done in {time.perf_counter() - start:.1f} s")


def progress(
    iterable: Iterable[T],
    desc: str = "",
    log: Callable[[str], None] | None = None,
    total: int | None = None,
    **tqdm_options: Any,
) -> Iterable[T]:
    """A tqdm bar on a terminal, periodic log lines otherwise."""
    if interactive():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit="step", **tqdm_options)
    return _logged(iterable, desc or "working", log or _stderr, total)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _logged(iterable: Iterable[T], desc: str, log: Callable[[str], None], total: int | None) -> Iterator[T]:
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    of = f"/{total}" if total is not None else ""
    start = last = time.perf_counter()
    count = 0
    log(f"{desc}: 0{of}")
    for item in iterable:
        yield item
        count += 1
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S:
            log(f"{desc}: {count}{of} ({now - start:.0f} s)")
            last = now
    log(f"{desc}: {count}{of} in {time.perf_counter() - start:.1f} s")
