"""Conditions -> the denoiser's condition tensors.

A *condition* is what a user asks for per sample: a class label, or a prompt. `encode` turns a list of
them into a `ConditionBatch` (the tensors Conditioning.inputs names, plus the unconditional branch:
the null class, or the empty prompt). Prompt encodings are computed once per prompt and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from core.errors import ConfigError
from core.ir import Conditioning, DiffusionProgram
from core.sampling import ConditionBatch

Condition = int | str


def condition_set(conditioning: Conditioning, prompts: Sequence[str], n: int) -> list[Any] | None:
    """The conditions of an n-sample evaluation set: classes cycling 0..num_classes-1, prompts cycling
    through the prompt set; None for an unconditional model."""
    if conditioning.text:
        if not prompts:
            raise ConfigError("a text-conditioned model needs a prompt set (--prompts FILE)")
        return [prompts[i % len(prompts)] for i in range(n)]
    return [i % conditioning.num_classes for i in range(n)] if conditioning.num_classes else None


def class_batch(conditioning: Conditioning, classes: Sequence[int] | None, n: int) -> ConditionBatch:
    """Class labels as the `class_labels` tensor; the null class is the unconditional branch."""
    if not conditioning.num_classes:
        return ConditionBatch({})
    if classes is None or len(classes) != n:
        raise ConfigError("a class-conditional model needs one label per seed")
    if any(not isinstance(c, int) or not 0 <= c < conditioning.num_classes for c in classes):
        raise ConfigError(f"class labels must lie in [0, {conditioning.num_classes})")
    labels = torch.tensor(list(classes), dtype=torch.int64)
    null = conditioning.null_class
    uncond = None if null is None else {"class_labels": torch.full_like(labels, null)}
    return ConditionBatch({"class_labels": labels}, uncond)


def example_conditions(conditioning: Conditioning, batch: int) -> dict[str, torch.Tensor]:
    """Placeholder condition tensors of the right shapes and dtypes (export, FLOP counts, latency):
    labels cycling over the classes, zeros elsewhere (masks of ones)."""
    tensors = {}
    for spec in conditioning.inputs:
        if spec.name == "class_labels":
            tensors[spec.name] = torch.arange(batch, dtype=torch.int64) % conditioning.num_classes
        else:
            fill = 1 if "mask" in spec.name else 0
            tensors[spec.name] = torch.full((batch, *spec.shape), fill, dtype=getattr(torch, spec.dtype))
    return tensors


def encode(program: DiffusionProgram, conditions: Sequence[Condition] | None, n: int) -> ConditionBatch:
    """The condition tensors of n samples for `program` (torch: the program's own prompt encoder)."""
    conditioning = program.spec.conditioning
    if not conditioning.text:
        return class_batch(conditioning, conditions, n)  # type: ignore[arg-type]
    from core.prompts import text_adapter, torch_prompt_encoder

    zeros = text_adapter(program).zero_uncond(program.stages)
    return prompt_batch(conditioning, conditions, n, torch_prompt_encoder(program), zeros)


def prompt_batch(
    conditioning: Conditioning, prompts: Sequence[Any] | None, n: int, encoder: Any, zero_uncond: bool = False
) -> ConditionBatch:
    """Prompts through `encoder` (prompts -> {name: [len(prompts), ...]}, any backend); the empty
    prompt's encoding is the unconditional branch (`zero_uncond`: zeros, as SDXL's pipeline does)."""
    if prompts is None or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("a text-conditioned model needs one prompt per seed")
    unique = list(dict.fromkeys([*prompts, ""]))
    table = encoder(unique)
    rows = torch.tensor([unique.index(p) for p in prompts])
    empty = torch.full_like(rows, unique.index(""))
    cond = {k: table[k][rows] for k in conditioning.input_names}
    uncond = {k: table[k][empty] for k in conditioning.input_names}
    if zero_uncond:
        uncond = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in uncond.items()}
    return ConditionBatch(cond, uncond)
