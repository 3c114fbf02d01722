"""Using the text-to-image digits pipelines: load a folder, draw images for prompts, measure prompt adherence."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zoo.attributes import evaluation_prompts
from zoo.tokenizer import MAX_LENGTH

# The shipped folders' sampling defaults (their scheduler is DDIM, see zoo.text2img.SAMPLING_SCHEDULER).
DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 4.0


def call_kwargs(pipe: Any) -> dict[str, Any]:
    """Arguments a pipeline call needs beyond the prompt (PixArt: no resolution binning, our 16 tokens)."""
    from diffusers import PixArtAlphaPipeline

    if isinstance(pipe, PixArtAlphaPipeline):
        return {"use_resolution_binning": False, "max_sequence_length": MAX_LENGTH, "clean_caption": False}
    return {}


def load_pipeline(folder: Path) -> Any:
    """A pipeline folder of either kind, on CPU in float32, progress bars off."""
    import diffusers

    name = diffusers.DiffusionPipeline.load_config(folder)["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> tuple[torch.Tensor, list[str]]:
    """Images [len(seeds) * len(prompts), 1, 16, 16] in [-1, 1] and their prompts: every prompt at every seed."""
    images, used = [], []
    for seed in seeds:
        gens = [torch.Generator().manual_seed(seed) for _ in prompts]
        out = pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pt",
            **call_kwargs(pipe),
        ).images
        images.append(out[:, :1] * 2 - 1)
        used += list(prompts)
    return torch.cat(images), used


def evaluate_pipeline(
    pipe: Any, seeds: int = 5, steps: int = DEFAULT_STEPS, guidances: Sequence[float] = (1.0, DEFAULT_GUIDANCE)
) -> dict[str, Any]:
    """Prompt adherence (zoo.attributes.adherence) over the evaluation prompts x seeds 0..seeds-1."""
    from zoo import load_classifier
    from zoo.attributes import adherence

    classifier = load_classifier()
    report = {}
    for guidance in guidances:
        images, prompts = generate(pipe, evaluation_prompts(), range(seeds), steps, guidance)
        report[f"guidance_{guidance:g}"] = adherence(images, prompts, classifier)
    return {"seeds": seeds, "steps": steps, "prompts": len(evaluation_prompts()), **report}
