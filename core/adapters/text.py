"""What text-conditioned adapters share: the pipeline's own tokenizers, its text encoders wrapped as one
export-friendly prompt encoder per family, and the conditioning read off that encoder.

A prompt encoder takes the token tensors `tokenize` returns (positional, in order) and returns the
denoiser's condition tensors in `CONDITIONS` order; it is lowered to ONNX like the denoiser, so a
served pipeline runs tokenizer -> prompt encoder -> denoiser loop -> decoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from core.adapters.base import Adapter
from core.errors import ConfigError, LoadError
from core.ir import Conditioning, ConditionInput, SamplingPlan, Stages

__all__ = ["TextAdapter", "flow_shift", "token_tensors"]


def flow_shift(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """The dynamic shift `mu` of flow-matching pipelines (SD3.5, Flux; Esser et al. 2024, "Scaling
    Rectified Flow Transformers"): linear in the image token count between the anchors of the
    scheduler's `config` (core.schedulers.full_config)."""
    lo_len, hi_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (hi - lo) / (hi_len - lo_len)
    return image_seq_len * slope + lo - slope * lo_len


def token_tensors(tokenizer: Any, prompts: Sequence[str], length: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded to `length`; a prompt longer than `length` tokens is refused
    (silently truncating it would verify an image of another prompt)."""
    for i, prompt in enumerate(prompts):
        count = len(tokenizer(prompt, add_special_tokens=True).input_ids)
        if count > length:
            raise ConfigError(f"prompt {i + 1} ({prompt[:40]!r}) is {count} tokens; {which} takes at most {length}")
    out = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out.input_ids.to(torch.int64), out.attention_mask.to(torch.int64)


class TextAdapter(Adapter):
    """A denoiser conditioned on prompt encodings (cross-attention or joint attention)."""

    # Token limit when the tokenizer's own is larger (T5 tokenizers say 512 or "infinite").
    MAX_TOKENS: ClassVar[int] = 77

    def conditioning(self, model: nn.Module) -> Conditioning:
        raise LoadError(f"{self.model_class} is text-conditioned: load it from a pipeline folder with its text encoder")

    def label_rows(self, model: nn.Module) -> int:
        return 0

    def check_conditioning(self, model: nn.Module, conditioning: Conditioning, where: str) -> None:
        if not conditioning.text:
            raise LoadError(f"{where}: {self.model_class} is text-conditioned; it takes no class conditioning")

    def lengths(self, stages: Stages) -> tuple[int, ...]:
        return tuple(min(int(t.model_max_length), self.MAX_TOKENS) for t in stages.tokenizers)

    def tokenize(self, stages: Stages, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token tensors by name, in the prompt encoder's argument order."""
        tokens: dict[str, torch.Tensor] = {}
        for i, (tokenizer, length) in enumerate(zip(stages.tokenizers, self.lengths(stages), strict=True)):
            suffix = "" if i == 0 else f"_{i + 1}"
            ids, mask = token_tensors(tokenizer, prompts, length, f"text encoder {i + 1}")
            tokens[f"input_ids{suffix}"] = ids
            if self.uses_mask(i):
                tokens[f"attention_mask{suffix}"] = mask
        return tokens

    def uses_mask(self, index: int) -> bool:
        """Whether the encoder at `index` takes the tokenizer's attention mask."""
        return False

    def prompt_encoder(self, stages: Stages, config: Mapping[str, Any]) -> nn.Module:
        """The prompt encoder for a denoiser of this `config`."""
        raise NotImplementedError

    def text_conditioning(self, stages: Stages, config: Mapping[str, Any]) -> Conditioning:
        """The condition tensors' names, per-sample shapes and dtypes, read off the encoder on one prompt."""
        encoder = self.prompt_encoder(stages, config).eval()
        with torch.inference_mode():
            outputs = encoder(*self.tokenize(stages, [""]).values())
        inputs = tuple(
            ConditionInput(name, tuple(out.shape[1:]), "float32")
            for name, out in zip(self.condition_names(stages), outputs, strict=True)
        )
        return Conditioning(text=inputs)

    def condition_names(self, stages: Stages) -> tuple[str, ...]:
        raise NotImplementedError

    def timestep_plan(self, config: dict[str, Any], plan: SamplingPlan) -> SamplingPlan:
        """The plan with what the family's pipeline passes to `set_timesteps` (flow matching: mu, sigmas)."""
        return plan

    def zero_uncond(self, stages: Stages) -> bool:
        """Whether the unconditional branch is zeros instead of the empty prompt's encoding (SDXL's
        force_zeros_for_empty_prompt)."""
        return False
