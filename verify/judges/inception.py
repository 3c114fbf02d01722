"""FID (Heusel et al. 2017) with the user's own copy of the Inception-v3 weights FID is defined on
(`--inception FILE`: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or the same tensors as
.safetensors): pool features of the decoded images (gray repeated to RGB), resized and scaled as
pytorch-fid does (verify/inception_v3.py), stated against the original's floor. Nothing is downloaded."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from core.errors import ConfigError
from core.ir import DiffusionProgram
from core.pixels import to_images
from verify.judges.base import Evaluate, FloorFD, Judge, JudgeOptions, Outputs, floor_metrics

PREFIX = "fid"
BATCH = 25
OPTIONAL = ("num_batches_tracked",)  # batch-norm counters: older state dicts lack them


class InceptionJudge(Judge):
    name = "inception"
    applies_to = "decoded images with 1 or 3 channels, with --inception (the FID weights)"
    metrics: ClassVar = floor_metrics(PREFIX, "in Inception-v3 pool features (FID)")

    def check_options(self, options: JudgeOptions) -> None:
        if options.inception is not None:
            network(options.inception)

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        return self.metric_keys() if options.inception is not None and _rgb_able(program) else frozenset()

    def why_not(self, program: DiffusionProgram, options: JudgeOptions) -> str:
        if options.inception is None:
            return "needs --inception FILE (pytorch-fid's Inception-v3 FID weights)"
        return f"applies to {self.applies_to}"

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        assert options.inception is not None
        model = network(options.inception)
        fd = FloorFD(PREFIX, features(model, reference.images), features(model, floor.images))
        return lambda candidate: fd(features(model, candidate.images))


def _rgb_able(program: DiffusionProgram) -> bool:
    from core.stages import image_shape

    shape = image_shape(program)
    return len(shape) == 3 and shape[0] in (1, 3)


def features(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Pool features of images in [-1, 1] ([N, 1 or 3, H, W])."""
    x = to_images(images)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    with torch.inference_mode():
        return torch.cat([model(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]).double().numpy()


@cache
def network(path: Path) -> torch.nn.Module:
    """The FID Inception network with the weights at `path`, every tensor checked for name, shape and
    dtype against the architecture (one line on the first mismatch, before any work)."""
    from verify.inception_v3 import FIDInceptionV3

    state = _read(path)
    model = FIDInceptionV3()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(
            f"--inception {path}: not the FID Inception-v3 weights ({len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected; {what})"
        )
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ConfigError(
                f"--inception {path}: tensor {key} is {tensor.dtype} {list(tensor.shape)}, expected {list(want.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"--inception {path}: tensor {key} holds non-finite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    return model.eval().requires_grad_(False)


def _read(path: Path) -> dict[str, torch.Tensor]:
    """The state dict as its own format reads it: safetensors, or a torch file without pickled code."""
    if not path.is_file():
        raise ConfigError(f"--inception {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torch file that is no state dict raises many types
        raise ConfigError(f"--inception {path}: not a readable state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--inception {path}: not a state dict of tensors")
    return state


JUDGE = InceptionJudge()
