"""Prompts -> condition tensors in torch: the family adapter's tokenizer and prompt encoder, each prompt
encoded once and kept in the stages' cache (calibration, passes and verification reuse it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from core.adapters import adapter_for
from core.adapters.text import TextAdapter
from core.ir import DiffusionProgram
from core.placement import at_module, from_module

PromptEncoderFn = Callable[[Sequence[str]], dict[str, torch.Tensor]]


def text_adapter(program: DiffusionProgram) -> TextAdapter:
    adapter = adapter_for(program.spec.model_class)
    if not isinstance(adapter, TextAdapter):
        raise TypeError(f"{program.spec.model_class} is not text-conditioned")
    return adapter


def torch_prompt_encoder(program: DiffusionProgram) -> PromptEncoderFn:
    """prompts -> {name: [len(prompts), ...]} in the conditioning's order, cached per prompt."""
    adapter, stages = text_adapter(program), program.stages
    names = program.spec.conditioning.input_names
    module = adapter.prompt_encoder(stages, program.spec.model_config).eval()

    def encode(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in stages.encoded]
        if missing:
            with torch.inference_mode():
                outputs = module(*at_module(module, adapter.tokenize(stages, missing).values()))
            for i, prompt in enumerate(missing):  # float32 on the host, whatever the encoder's placement
                stages.encoded[prompt] = {
                    n: from_module(out[i]).cpu().clone() for n, out in zip(names, outputs, strict=True)
                }
        return {n: torch.stack([stages.encoded[p][n] for p in prompts]) for n in names}

    return encode
