"""Model folders written atomically, and the training helpers the folder trainers share."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn


def write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a fresh folder beside `out`, then swap it in: `out` is complete or untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = tmp.with_suffix(".old")
    try:
        write(tmp)
        for path in [tmp, *tmp.rglob("*")]:  # save_pretrained may leave files owner-only (0600)
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


@contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` (0: leave it) for the block."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, parameters: Any) -> None:
    """Backward, clip the gradient norm at 1.0, step the optimizer, then its LR schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    opt.step()
    sched.step()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA with warm-up: the decay is min(decay, (1 + step) / (10 + step)), so no trace of the init lingers."""
    decay = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1 - decay)


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 10%."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
