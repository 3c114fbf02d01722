"""The training loop of the passes that train (recovery, distillation), data-parallel when launched
with `torchrun`.

One process: AdamW + cosine decay, stopped at `steps` or `max_seconds`. Under torchrun
(WORLD_SIZE > 1) every rank draws the same global batch from the same generator, keeps its shard,
and gradients are averaged with torch.distributed all_reduce (gloo on CPU, NCCL on GPU), as
DistributedDataParallel does; a loss normalized by a batch statistic takes that statistic over the
whole global batch (`Trainer.global_mean`). So N processes take the steps one process takes on the
same global batch (equal up to float summation order; tested with 2 CPU processes). The time budget
is agreed across ranks (the slowest decides), so all ranks stop at the same step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in a torchrun launch (initializing the process group once), or 1 of 1."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        # A backend per tensor device where a GPU exists: a --device cpu job on a GPU machine all-reduces with
        # gloo, a --device cuda one with NCCL (which takes device tensors only).
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


@dataclass(frozen=True)
class TrainLog:
    steps: int
    seconds: float
    losses: list[float]

    def first_last(self, window: int = 20) -> tuple[float, float]:
        """Mean loss over the first and the last `window` steps (at most a fifth of the run each)."""
        k = max(1, min(window, len(self.losses) // 5))
        return round(sum(self.losses[:k]) / k, 5), round(sum(self.losses[-k:]) / k, 5)


class Trainer:
    """Trains `model`'s parameters in place; `loss(batch)` sees this rank's shard of each global batch."""

    def __init__(self, model: nn.Module, lr: float, steps: int, max_seconds: float) -> None:
        self.model, self.lr = model, lr
        self.world = world()
        self.params = [p for p in model.parameters()]
        # Mixed precision (Micikevicius et al. 2018): a bf16/fp16 model (--dtype) computes its forward and
        # backward in its own precision; the optimizer steps float32 master copies, which are written back.
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        self.restart(steps, max_seconds)

    def restart(self, steps: int, max_seconds: float) -> None:
        """A fresh optimizer and cosine schedule over `steps` (a warm restart, SGDR: Loshchilov & Hutter 2017)."""
        self.steps, self.max_seconds = steps, max_seconds
        self.optimizer = torch.optim.AdamW(self.master, lr=self.lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, steps)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (the batch must divide evenly)."""
        if self.world.size == 1:
            return tensor
        if tensor.shape[0] % self.world.size:
            raise ConfigError(f"a global batch of {tensor.shape[0]} does not split over {self.world.size} processes")
        return tensor.chunk(self.world.size)[self.world.rank]

    def shard_rows(self, batch: int) -> torch.Tensor:
        """This rank's row indices into a global batch of `batch` rows."""
        return self.shard(torch.arange(batch))

    def global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A per-shard mean (no gradient) averaged over the ranks: the global batch's mean."""
        value = value.detach()
        if self.world.size == 1:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        return value / self.world.size

    def normalized_mse(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the target's energy (scale-free), the energy over the global batch."""
        return (output - target).square().mean() / self.global_mean(target.square().mean()).clamp_min(1e-12)

    def run(
        self,
        loss: Callable[[int], torch.Tensor],
        progress: Callable[..., Iterable] = lambda it, **_: it,
        desc: str = "training",
    ) -> TrainLog:
        """`loss(step)` builds the step's batch (same on every rank), shards it and returns this rank's loss."""
        for p in self.params:
            p.requires_grad_(True)
        losses, start = [], time.perf_counter()
        try:
            for step in progress(range(self.steps), desc=desc, leave=False):
                value = loss(step)
                self.optimizer.zero_grad(set_to_none=True)
                value.backward()
                self._average_gradients()
                self._to_master()
                self.optimizer.step()
                self._from_master()
                self.schedule.step()
                losses.append(float(self.global_mean(value)))
                if self._out_of_time(start):
                    break
        finally:
            for p in self.params:
                p.requires_grad_(False)
        return TrainLog(len(losses), round(time.perf_counter() - start, 1), losses)

    def _to_master(self) -> None:
        for p, m in zip(self.params, self.master, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()

    def _from_master(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                if m is not p:
                    p.copy_(m)

    def _average_gradients(self) -> None:
        if self.world.size == 1:
            return
        import torch.distributed as dist

        # Every rank runs the same code path, so the same parameters have gradients on all of them.
        used = [p for p in self.params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in used])
        dist.all_reduce(flat)
        flat /= self.world.size
        offset = 0
        for p in used:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _out_of_time(self, start: float) -> bool:
        # On the parameters' device: NCCL all-reduces device tensors only.
        device = self.params[0].device if self.params else torch.device("cpu")
        over = torch.tensor(float(time.perf_counter() - start > self.max_seconds), device=device)
        if self.world.size > 1:
            import torch.distributed as dist

            dist.all_reduce(over, op=dist.ReduceOp.MAX)
        return bool(over)


@dataclass(frozen=True)
class CheckedLog:
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    checks: list[dict]  # per chunk: training steps so far, the judge's value

    @property
    def shift(self) -> float | None:
        return self.checks[-1]["fd_shift"] if self.checks else None


def train_checked(
    trainer: Trainer,
    loss: Callable[[int], torch.Tensor],
    progress: Callable[..., Iterable],
    desc: str,
    chunk: int,
    total: int,
    max_seconds: float,
    judge: Callable[[], float] | None = None,
    bound: float = 0.0,
) -> CheckedLog:
    """`trainer` run on `loss` in chunks of `chunk` steps, each restarted (Trainer.restart), while
    `judge()` (a distribution shift, checked after each chunk) is over `bound`, up to `total` steps or
    `max_seconds`; without a judge, one chunk. Each chunk's progress lines name its steps and the shift
    that made it run."""
    total = max(chunk, total) if judge is not None else chunk
    trained, seconds, first, last = 0, 0.0, 0.0, 0.0
    checks: list[dict[str, float]] = []
    while trained < total and seconds < max_seconds:
        n = min(chunk, total - trained)
        why = f" (distribution shift {checks[-1]['fd_shift']:.3g}, bound {bound:g})" if checks else ""
        trainer.restart(n, max_seconds - seconds)
        log = trainer.run(loss, progress, f"{desc} {trained}..{trained + n}{why}")
        chunk_first, last = log.first_last()
        first = chunk_first if trained == 0 else first
        trained, seconds = trained + log.steps, seconds + log.seconds
        if judge is None:
            break
        checks.append({"steps": trained, "fd_shift": judge()})
        if checks[-1]["fd_shift"] <= bound:
            break
    return CheckedLog(trained, round(seconds, 1), first, last, checks)


class FeatureHooks:
    """Forward hooks recording the output of each (student module, teacher module) pair, teacher's then
    student's (`capture` says whose call runs); `loss()` averages `mse` over the pairs."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]], mse: Callable[..., torch.Tensor]) -> None:
        self.pairs, self.capture, self.mse = pairs, "teacher", mse
        self.outputs: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
        self.handles: list = []

    def __enter__(self) -> FeatureHooks:
        for role, index in (("student", 0), ("teacher", 1)):
            for pair in self.pairs:
                self.handles.append(pair[index].register_forward_hook(self._record(role)))
        return self

    def _record(self, role: str):
        def hook(_module, _args, output):
            if self.capture == role:
                self.outputs[role].append(output[0] if isinstance(output, tuple) else output)

        return hook

    def clear(self) -> None:
        self.outputs = {"teacher": [], "student": []}

    def loss(self) -> torch.Tensor:
        pairs = zip(self.outputs["student"], self.outputs["teacher"], strict=True)
        return torch.stack([self.mse(s, t) for s, t in pairs]).mean()

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def distillation_loss(
    trainer: Trainer,
    features: FeatureHooks,
    teacher: Callable[..., torch.Tensor],
    student: Callable[..., torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]],
    feature_weight: float,
) -> torch.Tensor:
    """On this rank's shard of a global batch (x, t, condition tensors): the student's output vs the
    teacher's, plus `feature_weight` x the hooked pairs' feature loss, each normalized by the teacher's energy."""
    x, conds = trainer.shard(batch[0]), tuple(trainer.shard(c) for c in batch[2])
    t = trainer.shard(batch[1])
    features.clear()
    with torch.no_grad():
        features.capture = "teacher"
        target = teacher(x, t, *conds)
    features.capture = "student"
    value = trainer.normalized_mse(student(x, t, *conds), target)
    if feature_weight and features.pairs:
        value = value + feature_weight * features.loss()
    return value
