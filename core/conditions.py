"""Conditions -> the denoiser's condition tensors.

A *condition* is what a user asks for per sample: a class label, a prompt, or an observation (named raw
tensors, one sample's, from a data set or an environment). `encode` turns a list of them into a
`ConditionBatch` (the tensors Conditioning.inputs names, plus the unconditional branch: the null class, or
the empty prompt; observations have none). Prompt encodings are computed once per prompt and cached;
observations are normalized as their inputs say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.errors import ConfigError
from core.ir import Conditioning, DiffusionProgram, Stages
from core.sampling import ConditionBatch

Observation = Mapping[str, torch.Tensor]  # one sample's raw observation tensors, by input name
Condition = int | str | Observation


def condition_set(conditioning: Conditioning, stages: Stages, n: int) -> list[Any] | None:
    """The conditions of an n-sample evaluation set: classes cycling 0..num_classes-1, prompts cycling
    through the prompt set, observations cycling through the observation set; None for an unconditional model."""
    if conditioning.text:
        prompts = stages.prompts
        if not prompts:
            raise ConfigError("a text-conditioned model needs a prompt set (--prompts FILE)")
        return [prompts[i % len(prompts)] for i in range(n)]
    if conditioning.observation:
        names = set(conditioning.input_names)
        if set(stages.observations) != names:
            raise ConfigError(
                f"an observation set needs exactly the tensors {sorted(names)}, got {sorted(stages.observations)}"
            )
        return split_rows(stages.observations, n)
    return [i % conditioning.num_classes for i in range(n)] if conditioning.num_classes else None


def split_rows(observations: Mapping[str, torch.Tensor], n: int | None = None) -> list[dict[str, torch.Tensor]]:
    """An observation set's rows as one observation each (every tensor the same number of rows, at least
    one): `n` of them cycling through the rows, or each row once."""
    rows = {v.shape[0] if v.dim() else 0 for v in observations.values()}
    if len(rows) != 1 or min(rows) < 1:
        raise ConfigError("an observation set's tensors need the same number of rows (at least one)")
    count = rows.pop()
    return [{k: v[i % count] for k, v in observations.items()} for i in range(count if n is None else n)]


def observation_batch(conditioning: Conditioning, observations: Sequence[Any] | None, n: int) -> ConditionBatch:
    """One raw observation per sample -> the normalized condition tensors (no unconditional branch)."""
    if observations is None or len(observations) != n or not all(isinstance(o, Mapping) for o in observations):
        raise ConfigError("an observation-conditioned model needs one observation per seed")
    if any(set(o) != set(conditioning.input_names) for o in observations):
        raise ConfigError(f"each observation needs exactly the tensors {list(conditioning.input_names)}")
    tensors = {}
    for spec in conditioning.observation:
        rows = [torch.as_tensor(o[spec.name]) for o in observations]
        dtype = getattr(torch, spec.dtype)
        if any(tuple(r.shape) != spec.shape or r.dtype != dtype for r in rows):
            raise ConfigError(f"observation '{spec.name}' must be {spec.dtype} of shape {list(spec.shape)} per sample")
        value = torch.stack(rows)
        tensors[spec.name] = value if spec.normalization is None else spec.normalization.normalize(value)
    return ConditionBatch(tensors)


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
    if conditioning.observation:
        return observation_batch(conditioning, conditions, n)
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
