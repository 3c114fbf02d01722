"""The project's own checkpoint format: `<stem>.safetensors` (or `.ckpt`) plus a `<stem>.json` sidecar.

The sidecar names the model class (a diffusers class, or one of core.networks) and its config, the
conditioning (class count and the null class used for guidance), the default sampling plan and, for a
policy, the environment it acts in (`environment`, e.g. "pusht").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.fileio import write_atomic, write_json

FORMAT = "diffusion-optimizer-checkpoint"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
VERSION = 1

if TYPE_CHECKING:
    import torch


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_checkpoint(weights: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write weights as safetensors and the sidecar JSON, each atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomic(weights, lambda tmp: save_file(tensors, str(tmp)))
    write_json(sidecar_path(weights), {"format": FORMAT, "version": VERSION, **meta})
