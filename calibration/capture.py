"""Record (x_t, t, condition tensors, model output) at every step of the reference program on fixed seeds.

Stored as safetensors with a fingerprint of the program, so a later run can reuse it safely.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core import seeds
from core.conditions import condition_set, encode, split_rows
from core.errors import ConfigError, LoadError
from core.fileio import require_regular_file, write_atomic
from core.ir import DiffusionProgram
from core.sampling import sample, uses_guidance
from core.schedulers import model_calls
from core.variants import torch_loop

CALIBRATION_SEED = seeds.CALIBRATION  # calibration seeds start here, evaluation seeds at 0 (core.seeds)
COND_PREFIX = "cond."  # condition tensors are stored as cond.<name>
OBS_PREFIX = "obs."  # an observation model's raw observations (one row per sample) as obs.<name>
OBSERVED = "observations"  # the `conditions` metadata of such a file: they are its obs.<name> tensors


def evaluation_set(program: DiffusionProgram, n: int, base_seed: int) -> tuple[list[int], list | None]:
    """Seeds base_seed.. and their conditions: classes cycling 0..num_classes-1, or the prompt set's
    prompts in turn (None for an unconditional model)."""
    seeds = list(range(base_seed, base_seed + n))
    return seeds, condition_set(program.spec.conditioning, program.stages, n)


@dataclass(frozen=True)
class Trajectories:
    """Per step s: the model's inputs x[s] ([N, C, H, W]; N doubles under guidance), t[s], the condition
    tensors fed to the model (`cond`, the unconditional branch in the second half under guidance), outputs."""

    x: torch.Tensor  # [S, N, C, H, W]
    t: torch.Tensor  # [S] float32
    cond: dict[str, torch.Tensor]  # name -> [N, ...] (e.g. class_labels int64, encoder_hidden_states)
    output: torch.Tensor  # [S, N, C, H, W] raw model outputs (before guidance)
    final: torch.Tensor  # [B, C, H, W] final samples in model space
    seeds: tuple[int, ...]
    conditions: tuple | None  # per sample: its class, prompt or raw observation (None: unconditional)
    fingerprint: str

    @property
    def steps(self) -> int:
        return self.x.shape[0]


def capture(
    program: DiffusionProgram,
    seeds: Sequence[int],
    conditions: Sequence[Any] | None,
    denoise: Callable | None = None,
    progress: Callable[[Any], Any] = lambda it: it,
) -> Trajectories:
    xs, ts, outs, fed = [], [], [], {}

    def observe(i: int, t: torch.Tensor, x: torch.Tensor, cond: Any, out: torch.Tensor) -> None:
        xs.append(x.cpu().clone())  # captures stay in host memory, whatever the program's device
        ts.append(t[0].cpu().clone())
        outs.append(out.cpu().clone())
        fed.update({k: v.cpu() for k, v in cond.items()})

    final = sample(
        program.plan,
        program.spec.sample_shape,
        denoise or torch_loop(program),
        seeds,
        encode(program, conditions, len(seeds)),
        observer=observe,
        progress=progress,
        device=program.placement.device if denoise is None else "cpu",
    )
    return Trajectories(
        x=torch.stack(xs),
        t=torch.stack(ts).float(),
        cond=dict(fed),
        output=torch.stack(outs),
        final=final,
        seeds=tuple(seeds),
        conditions=tuple(conditions) if conditions is not None else None,
        fingerprint=program.fingerprint(),
    )


def capture_calibration(
    program: DiffusionProgram, samples: int, seed: int = 0, progress: Callable[[Any], Any] = lambda it: it
) -> Trajectories:
    """The calibration set: `samples` trajectories of `program` on seeds CALIBRATION_SEED + seed + i."""
    seeds, conditions = evaluation_set(program, samples, CALIBRATION_SEED + seed)
    return capture(program, seeds, conditions, progress=progress)


def save(traj: Trajectories, path: Path) -> None:
    tensors = {"x": traj.x, "t": traj.t, "output": traj.output, "final": traj.final}
    tensors |= {COND_PREFIX + k: v for k, v in traj.cond.items()}
    conditions: Any = traj.conditions
    if conditions and isinstance(conditions[0], Mapping):
        tensors |= {OBS_PREFIX + k: torch.stack([o[k] for o in conditions]) for k in conditions[0]}
        conditions = OBSERVED
    meta = {
        "fingerprint": traj.fingerprint,
        "seeds": json.dumps(traj.seeds),
        "conditions": json.dumps(conditions),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: _save(tensors, tmp, meta))


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """safetensors reports a full disk as its own error: raised as the OSError it is (exit 2)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata=meta)
    except SafetensorError as exc:
        if "os error 28" in str(exc) or "No space left" in str(exc):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise


def load(path: Path, program: DiffusionProgram | None = None) -> Trajectories:
    """Read a capture; with `program`, refuse one captured from a different model or loop."""
    require_regular_file(path, "calibration file", LoadError)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as exc:
        raise LoadError(f"{path}: not a readable calibration file ({exc})") from exc
    if program is not None and meta.get("fingerprint") != program.fingerprint():
        raise ConfigError(f"{path}: captured from a different model or sampling plan; capture it again")
    try:
        seeds, conditions = json.loads(meta.get("seeds", "[]")), json.loads(meta.get("conditions", "null"))
        if conditions == OBSERVED:
            conditions = split_rows(_prefixed(tensors, OBS_PREFIX))
        elif conditions is not None and not all(isinstance(c, int | str) for c in conditions):
            raise ValueError("conditions must be classes, prompts or observations")
        traj = Trajectories(
            x=tensors["x"],
            t=tensors["t"],
            cond=_prefixed(tensors, COND_PREFIX),
            output=tensors["output"],
            final=tensors["final"],
            seeds=tuple(int(s) for s in seeds),
            conditions=tuple(conditions) if conditions is not None else None,
            fingerprint=meta.get("fingerprint", ""),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise LoadError(f"{path}: not a calibration capture ({exc})") from None
    if program is not None:
        _check_matches(traj, program, path)
    return traj


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors stored as <prefix><name>, by name."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _check_matches(traj: Trajectories, program: DiffusionProgram, path: Path) -> None:
    """A file with the right fingerprint must also have the shapes and values the plan implies."""
    spec, plan = program.spec, program.plan
    n = len(traj.seeds)
    batch = n * (2 if uses_guidance(plan, spec.conditioning) else 1)
    calls = model_calls(plan)
    step = (calls, batch, *spec.sample_shape)
    expected = {"x": step, "output": step, "t": (calls,), "final": (n, *spec.sample_shape)}
    for name, shape in expected.items():
        tensor = getattr(traj, name)
        if tuple(tensor.shape) != shape or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise LoadError(f"{path}: tensor '{name}' must be finite floats of shape {list(shape)}")
    conditioned = bool(spec.conditioning.inputs)
    if n < 1 or (conditioned and (traj.conditions is None or len(traj.conditions) != n)):
        raise LoadError(f"{path}: seeds and conditions do not match the capture")
    if set(traj.cond) != set(spec.conditioning.input_names):
        raise LoadError(f"{path}: condition tensors {sorted(traj.cond)} do not match the model's")
    if spec.conditioning.observation:
        try:
            encoded = encode(program, traj.conditions, n)
        except ConfigError as exc:
            raise LoadError(f"{path}: observations do not fit the model ({exc})") from None
        if any(not torch.equal(encoded.cond[k], traj.cond[k][:n]) for k in encoded.cond):
            raise LoadError(f"{path}: the normalized observations differ from the raw ones the file stores")
    for cin in spec.conditioning.inputs:
        tensor = traj.cond[cin.name]
        if tuple(tensor.shape) != (batch, *cin.shape) or tensor.dtype != getattr(torch, cin.dtype):
            raise LoadError(f"{path}: tensor '{cin.name}' must be {cin.dtype} of shape {[batch, *cin.shape]}")
