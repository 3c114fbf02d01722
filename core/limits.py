"""What a run may cost, estimated before anything real is built.

A config's repetition counts and sizes are capped first (a config with 10^9 layers is refused in
microseconds); then the denoiser's footprint is measured on torch's `meta` device (core.footprint: the exact
parameter count and the largest activation of one call). Memory for loading, and for a whole job (weights,
the batched sampling loop, the captured trajectories), is estimated from those and compared with the memory
available now.
`--allow-large` turns the memory refusal off for the deliberately huge; the caps stay.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import LimitError, LoadError
from core.seeds import MAX_FAMILY, MAX_SEED  # noqa: F401 (MAX_SEED: the bound every seed option uses)
from core.validate import is_int

MAX_TRAIN_TIMESTEPS = 100_000
MAX_STEPS = 1_000
MAX_SAMPLE_ELEMENTS = 1 << 26  # one sample's elements (a 121-frame 720p video latent is ~2.2M)
MAX_SAMPLES = MAX_FAMILY  # a seed family's size: the sets a run draws must not overlap (core.seeds)
MAX_REPEATS = 10_000
MAX_WORKERS = 64  # --workers: search trial processes on one machine
MAX_INPUTS = 65_536  # calibration inputs / samples a pass may hold at once
MAX_CONFIG_INT = 1 << 31
BYTES = 4  # fp32
LIVE_TENSORS = 4  # a call holds its input, output and a few intermediates of the largest size at once
JOB_WEIGHT_COPIES = 5  # reference, candidate, a pass's working copy, ONNX export, the ORT session
GIB = 1 << 30


@dataclass(frozen=True)
class Footprint:
    """Measured on the meta device: parameters, and the largest tensor of one denoiser call per sample."""

    parameters: int
    activation_elements: int

    @property
    def weight_bytes(self) -> int:
        return self.parameters * BYTES

    def call_bytes(self, batch: int) -> int:
        return LIVE_TENSORS * batch * self.activation_elements * BYTES


def check_caps(config: dict[str, Any], caps: dict[str, int], where: str) -> None:
    """Counts and sizes that cost time or memory before any estimate can run: positive and capped.
    A list value (e.g. UNet block_out_channels) is checked element by element and capped in length."""
    for key, value in config.items():
        if isinstance(value, list | tuple) and len(value) > 64:
            raise LoadError(f"{where}: '{key}' has {len(value):,} entries; no supported config has more than 64")
    for key, cap in caps.items():
        value = config.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        if isinstance(value, list | tuple) and not 0 < len(value) <= 16:
            raise LoadError(f"{where}: '{key}' must have 1 to 16 entries, got {len(value)}")
        for v in values:
            if not is_int(v) or not 0 < v <= cap:
                raise LoadError(f"{where}: '{key}' must be an integer in [1, {cap:,}], got {v!r}")


def available_memory() -> int:
    """Bytes a new allocation can get now: the kernel's MemAvailable (else physical memory), and no
    more than this process's cgroup (a container's limit) has left."""
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
    except OSError:
        pass
    headroom = cgroup_headroom()
    return have if headroom is None else min(have, headroom)


NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Limit minus usage of the memory cgroup this process is in (v2 `memory.max` / `memory.current`, v1
    `memory.limit_in_bytes` / `memory.usage_in_bytes`), or None when there is no limit or no cgroup."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        rel = path.lstrip("/")
        if controllers == "":  # v2: one unified hierarchy
            candidates += [(root / rel, "memory.max", "memory.current"), (root, "memory.max", "memory.current")]
        elif "memory" in controllers.split(","):
            v1 = root / "memory"
            candidates += [(v1 / rel, "memory.limit_in_bytes", "memory.usage_in_bytes")]
            candidates += [(v1, "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for folder, limit_file, usage_file in candidates:
        try:
            limit, usage = (folder / limit_file).read_text().strip(), (folder / usage_file).read_text().strip()
        except OSError:
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= NO_LIMIT:
            return None
        return max(0, int(limit) - int(usage)) if usage.isdigit() else int(limit)
    return None


def require_memory(need: int, what: str, advice: str, allow_large: bool) -> None:
    if allow_large:
        return
    have = available_memory()
    if need > have:
        raise LimitError(
            f"{what} needs about {need / GIB:.1f} GiB of memory and {have / GIB:.1f} GiB is available; "
            f"{advice} (or pass --allow-large to try anyway)"
        )


def trajectory_bytes(sample_shape: tuple[int, ...], steps: int, batch: int) -> int:
    """A capture: model inputs and outputs at every step, kept twice while stacked."""
    elements = 1
    for d in sample_shape:
        elements *= d
    return 2 * 2 * steps * batch * elements * BYTES


def job_memory(fp: Footprint, sample_shape: tuple[int, ...], steps: int, guided: bool, samples: int) -> int:
    """The peak of a job whose largest batch samples `samples` seeds at once: weights, one batched call,
    the reference trajectories and the candidate's (the same size, in the worst case)."""
    batch = samples * (2 if guided else 1)
    return JOB_WEIGHT_COPIES * fp.weight_bytes + fp.call_bytes(batch) + 2 * trajectory_bytes(sample_shape, steps, batch)


DEVICE_WEIGHT_COPIES = 2  # on a GPU: the program and a pass's working copy (trajectories stay on the host)


def device_job_memory(fp: Footprint, element_bytes: int, guided: bool, samples: int) -> int:
    """What a job holds on a GPU (--device cuda) in its --dtype's `element_bytes`: two copies of the weights
    and one batched call of `samples` seeds (the loop's latents and the captures stay on the host)."""
    batch = samples * (2 if guided else 1)
    live = LIVE_TENSORS * batch * fp.activation_elements * element_bytes
    return DEVICE_WEIGHT_COPIES * fp.parameters * element_bytes + live


def require_device_memory(need: int, device: str, advice: str, allow_large: bool) -> None:
    """Refuse a run that would not fit in what the GPU has free now (torch.cuda.mem_get_info)."""
    if allow_large or not device.startswith("cuda"):
        return
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if need > free:
        raise LimitError(
            f"this run needs about {need / GIB:.1f} GiB on {device} and {free / GIB:.1f} GiB is free there; "
            f"{advice} (or pass --allow-large to try anyway)"
        )
