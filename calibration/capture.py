"""Record (x_t, t, class, model output) at every step of the reference program on fixed seeds.

Stored as safetensors with a fingerprint of the program, so a later run can reuse it safely.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import ConfigError, LoadError
from core.fileio import write_atomic
from core.ir import DiffusionProgram
from core.sampling import sample, uses_guidance
from core.variants import torch_loop

CALIBRATION_SEED = 10_000  # calibration seeds start here; evaluation seeds at 0: the two sets are disjoint


def evaluation_set(n: int, num_classes: int, base_seed: int) -> tuple[list[int], list[int] | None]:
    """Seeds base_seed.. and, for class-conditional models, classes cycling 0..num_classes-1."""
    seeds = list(range(base_seed, base_seed + n))
    return seeds, ([i % num_classes for i in range(n)] if num_classes else None)


@dataclass(frozen=True)
class Trajectories:
    """Per step s: the model's inputs x[s] ([N, C, H, W]; N doubles under guidance), t[s], labels, outputs."""

    x: torch.Tensor  # [S, N, C, H, W]
    t: torch.Tensor  # [S] float32
    labels: torch.Tensor | None  # [N] int64, the labels fed to the model (null class for the uncond half)
    output: torch.Tensor  # [S, N, C, H, W] raw model outputs (before guidance)
    final: torch.Tensor  # [B, C, H, W] final samples in model space
    seeds: tuple[int, ...]
    classes: tuple[int, ...] | None
    fingerprint: str

    @property
    def steps(self) -> int:
        return self.x.shape[0]


def capture(
    program: DiffusionProgram,
    seeds: Sequence[int],
    classes: Sequence[int] | None,
    denoise: Callable | None = None,
    progress: Callable[[Any], Any] = lambda it: it,
) -> Trajectories:
    xs, ts, outs, labels = [], [], [], []

    def observe(i: int, t: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, out: torch.Tensor) -> None:
        xs.append(x.clone())
        ts.append(t[0].clone())
        outs.append(out.clone())
        labels[:] = [y]

    final = sample(
        program.plan,
        program.spec.conditioning,
        program.spec.sample_shape,
        denoise or torch_loop(program),
        seeds,
        classes,
        observer=observe,
        progress=progress,
    )
    return Trajectories(
        x=torch.stack(xs),
        t=torch.stack(ts).float(),
        labels=labels[0],
        output=torch.stack(outs),
        final=final,
        seeds=tuple(seeds),
        classes=tuple(classes) if classes is not None else None,
        fingerprint=program.fingerprint(),
    )


def capture_calibration(
    program: DiffusionProgram, samples: int, seed: int = 0, progress: Callable[[Any], Any] = lambda it: it
) -> Trajectories:
    """The calibration set: `samples` trajectories of `program` on seeds CALIBRATION_SEED + seed + i."""
    seeds, classes = evaluation_set(samples, program.spec.conditioning.num_classes, CALIBRATION_SEED + seed)
    return capture(program, seeds, classes, progress=progress)


def save(traj: Trajectories, path: Path) -> None:
    tensors = {"x": traj.x, "t": traj.t, "output": traj.output, "final": traj.final}
    if traj.labels is not None:
        tensors["labels"] = traj.labels
    meta = {"fingerprint": traj.fingerprint, "seeds": json.dumps(traj.seeds), "classes": json.dumps(traj.classes)}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load(path: Path, program: DiffusionProgram | None = None) -> Trajectories:
    """Read a capture; with `program`, refuse one captured from a different model or loop."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as exc:
        raise LoadError(f"{path}: not a readable calibration file ({exc})") from exc
    if program is not None and meta.get("fingerprint") != program.fingerprint():
        raise ConfigError(f"{path}: captured from a different model or sampling plan; capture it again")
    try:
        seeds, classes = json.loads(meta.get("seeds", "[]")), json.loads(meta.get("classes", "null"))
        traj = Trajectories(
            x=tensors["x"],
            t=tensors["t"],
            labels=tensors.get("labels"),
            output=tensors["output"],
            final=tensors["final"],
            seeds=tuple(int(s) for s in seeds),
            classes=tuple(int(c) for c in classes) if classes is not None else None,
            fingerprint=meta.get("fingerprint", ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{path}: not a calibration capture ({exc})") from None
    if program is not None:
        _check_matches(traj, program, path)
    return traj


def _check_matches(traj: Trajectories, program: DiffusionProgram, path: Path) -> None:
    """A file with the right fingerprint must also have the shapes and values the plan implies."""
    spec, plan = program.spec, program.plan
    n = len(traj.seeds)
    batch = n * (2 if uses_guidance(plan, spec.conditioning) else 1)
    step = (plan.num_inference_steps, batch, *spec.sample_shape)
    expected = {"x": step, "output": step, "t": (plan.num_inference_steps,), "final": (n, *spec.sample_shape)}
    for name, shape in expected.items():
        tensor = getattr(traj, name)
        if tuple(tensor.shape) != shape or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise LoadError(f"{path}: tensor '{name}' must be finite floats of shape {list(shape)}")
    classes = spec.conditioning.num_classes
    if n < 1 or (classes and (traj.classes is None or len(traj.classes) != n)):
        raise LoadError(f"{path}: seeds and classes do not match the capture")
    if classes and (traj.labels is None or tuple(traj.labels.shape) != (batch,) or traj.labels.dtype != torch.int64):
        raise LoadError(f"{path}: tensor 'labels' must be int64 of shape [{batch}]")
