"""CLIP (Radford et al. 2021) with the user's own CLIP model folder (`--clip DIR`, a transformers
`CLIPModel` as `save_pretrained` writes it or the hub ships it, safetensors weights): the CLIP score of a
text-to-image model's images against their prompts (100 x the cosine of image and text embeddings, floored
at 0, as torchmetrics' CLIPScore; adherence), and the Fréchet distance in CLIP image-embedding space
against the original's floor (distribution). Read with transformers' own classes; nothing is downloaded."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from core.errors import ConfigError, one_line
from core.ir import DiffusionProgram
from core.pixels import to_images
from verify.judges.base import ADHERENCE, Evaluate, FloorFD, Judge, JudgeOptions, Metric, Outputs, floor_metrics

PREFIX = "fd_clip"
BATCH = 32


class Clip:
    """A CLIP model, its image processor and tokenizer, read from one folder."""

    def __init__(self, folder: Path) -> None:
        import json

        import transformers
        from transformers import AutoTokenizer, CLIPModel

        # transformers >= 5 names the PIL-based processor apart (the default one needs torchvision).
        # (Not getattr's default: touching transformers.CLIPImageProcessor without torchvision warns.)
        if hasattr(transformers, "CLIPImageProcessorPil"):
            processor = transformers.CLIPImageProcessorPil
        else:
            processor = transformers.CLIPImageProcessor

        config = folder / "config.json"
        if not config.is_file():
            raise ConfigError(f"--clip {folder}: no config.json (a transformers CLIP model folder is expected)")
        try:
            kind = json.loads(config.read_text()).get("model_type")
        except (ValueError, AttributeError):
            kind = None
        if kind != "clip":
            raise ConfigError(f"--clip {folder}: config.json is not a CLIP model's (model_type {kind!r})")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
            self.processor = processor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"--clip {folder}: cannot be read as a CLIP model ({one_line(exc, 200)})") from None
        self.model.requires_grad_(False)
        image, text = self.images(torch.zeros(1, 3, 32, 32)), self.texts(["a"])
        if image.shape != (1, self.model.config.projection_dim) or text.shape != image.shape:
            raise ConfigError(
                f"--clip {folder}: image and text embeddings do not fit ({list(image.shape)} vs {list(text.shape)})"
            )

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings of images in [-1, 1] ([N, 1 or 3, H, W])."""
        pixels = (to_images(images).expand(-1, 3, -1, -1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        out = []
        for start in range(0, len(pixels), BATCH):
            batch = self.processor(images=list(pixels[start : start + BATCH]), return_tensors="pt")
            with torch.inference_mode():
                out.append(_embeds(self.model.get_image_features(pixel_values=batch["pixel_values"])))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    def texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            return torch.nn.functional.normalize(_embeds(self.model.get_text_features(**tokens)).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: tuple) -> float:
        """Mean CLIP score: 100 x max(cos(image, its prompt), 0)."""
        unique = list(dict.fromkeys(prompts))
        table = self.texts(unique)
        text = table[torch.tensor([unique.index(p) for p in prompts])]
        return float((100 * (self.images(images) * text).sum(-1)).clamp_min(0).mean())


@cache
def load(folder: Path) -> Clip:
    if not folder.is_dir():
        raise ConfigError(f"--clip {folder}: no such folder")
    return Clip(folder)


class ClipJudge(Judge):
    name = "clip"
    applies_to = "decoded images with 1 or 3 channels, with --clip (a CLIP model folder); the score for prompts"
    metrics: ClassVar = (
        Metric("clip_score_drop", ADHERENCE, "drop of the mean CLIP score against the prompts"),
        Metric("clip_score_reference", ADHERENCE, "the reference's mean CLIP score"),
        Metric("clip_score_candidate", ADHERENCE, "the candidate's mean CLIP score"),
        *floor_metrics(PREFIX, "in CLIP image embeddings"),
    )
    SCORE: ClassVar = frozenset({"clip_score_drop", "clip_score_reference", "clip_score_candidate"})

    def check_options(self, options: JudgeOptions) -> None:
        if options.clip is not None:
            load(options.clip)

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        from core.stages import image_shape

        shape = image_shape(program)
        if options.clip is None or len(shape) != 3 or shape[0] not in (1, 3):
            return frozenset()
        return self.metric_keys() if program.spec.conditioning.text else self.metric_keys() - self.SCORE

    def why_not(self, program: DiffusionProgram, options: JudgeOptions) -> str:
        if options.clip is None:
            return "needs --clip DIR (a CLIP model folder)"
        return f"applies to {self.applies_to}"

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        assert options.clip is not None
        clip = load(options.clip)
        fd = FloorFD(PREFIX, _np(clip.images(reference.images)), _np(clip.images(floor.images)))
        prompts = reference.conditions if program.spec.conditioning.text else None
        ref_score = None if prompts is None else clip.score(reference.images, prompts)

        def evaluate(candidate: Outputs) -> dict[str, Any]:
            summary: dict[str, Any] = fd(_np(clip.images(candidate.images)))
            if prompts is not None and ref_score is not None:
                score = clip.score(candidate.images, prompts)
                summary |= {
                    "clip_score_reference": ref_score,
                    "clip_score_candidate": score,
                    "clip_score_drop": ref_score - score,
                }
            return summary

        return evaluate


def _embeds(output: Any) -> torch.Tensor:
    """The projected embeddings: transformers < 5 returns them, >= 5 as the output's pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _np(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()


JUDGE = ClipJudge()
