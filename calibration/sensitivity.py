"""One-shot sensitivity: how far the network's output moves when one edit (a block removed, a block's
attention replaced, ...) is applied alone, on calibration inputs stratified over the plan's timesteps
(LAPTOP-Diff's one-shot criterion; the layer_removal and linearize passes rank blocks by it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import torch

from calibration import selection
from calibration.capture import Trajectories
from core.adapters import Denoiser


def output_distortions(
    module: Denoiser,
    calibration: Trajectories,
    samples: int,
    batch: int,
    rng: torch.Generator,
    edits: Sequence[Callable[[], AbstractContextManager]],
    progress: Callable[..., Iterable],
    desc: str,
) -> list[float]:
    """Per edit, the squared error of `module.apply`'s outputs with that edit applied, over the unedited
    outputs' energy. Each edit is a context manager factory: it applies the edit on entry and undoes it
    on exit, so every score sees the network with that one edit only."""
    inputs = selection.select(calibration, "timestep", samples, rng)
    batches = list(inputs.batches(batch))
    scores = []
    with torch.no_grad():
        reference = [module.apply(x, t, y) for x, t, y in batches]
        energy = sum(float(r.square().sum()) for r in reference)
        for edit in progress(edits, desc=desc, leave=False):
            with edit():
                error = sum(
                    float((module.apply(x, t, y) - r).square().sum())
                    for (x, t, y), r in zip(batches, reference, strict=True)
                )
            scores.append(error / energy)
    return scores
