"""A latent pipeline's stages around the denoiser, read from a diffusers pipeline folder: text encoders
and tokenizers (transformers), the VAE (diffusers), the prompt set; and the decoder stage.

Only known classes are built, weights only from safetensors, every weight checked finite, and the
memory they need checked before they are read (see limits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import limits
from core.errors import ConfigError, LoadError, one_line
from core.fileio import require_regular_file
from core.ir import Stages
from core.placement import at_module, from_module
from core.weightfiles import WeightFiles

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
VAE_CLASSES = ("AutoencoderKL",)
PROMPTS_FILE = "prompts.txt"  # a pipeline folder's own prompt set, one prompt per line
MAX_PROMPTS = 100_000
MAX_PROMPT_CHARS = 2_000


def components(index: dict[str, Any], names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(component, class name) of every `names` entry model_index.json sets (a null entry is absent)."""
    found = []
    for name in names:
        entry = index.get(name)
        if entry is None or entry == [None, None]:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise LoadError(f"model_index.json: '{name}' must be [library, class name], got {entry!r}")
        found.append((name, entry[1]))
    return found


def load_stages(
    folder: Path,
    index: dict[str, Any],
    allow_large: bool,
    prompts: tuple[str, ...] | None,
    weights: dict[str, WeightFiles],
) -> Stages:
    """Text encoders, tokenizers and VAE of a pipeline folder, and its prompt set (`prompts` overrides
    the folder's prompts.txt). `weights`: each encoder's and the VAE's files (core.weightfiles), which their
    libraries are told to read (the same variant and format), in float32 whatever they store."""
    encoders = components(index, TEXT_ENCODERS)
    tokenizers = components(index, TOKENIZERS)
    if len(encoders) != len(tokenizers):
        raise LoadError(f"{folder}: model_index.json names {len(encoders)} text encoders, {len(tokenizers)} tokenizers")
    vae = components(index, ("vae",))
    allowed = {"text_encoder": ENCODER_CLASSES, "tokenizer": TOKENIZER_CLASSES, "vae": VAE_CLASSES}
    for name, cls in [*encoders, *tokenizers, *vae]:
        known = allowed[name.rstrip("_23")]
        if cls not in known:
            raise LoadError(f"{folder}: unsupported {name} class '{cls}' (supported: {', '.join(known)})")
        if not (folder / name).is_dir():
            raise LoadError(f"{folder}: model_index.json names '{name}', but the folder has no {name}/")
    missing = [name for name, _ in [*encoders, *vae] if name not in weights]
    if missing:
        raise LoadError(f"{folder}: no weights chosen for {', '.join(missing)}")
    need = 2 * sum(f.stat().st_size for name, _ in [*encoders, *vae] for f in weights[name].weights)
    limits.require_memory(need, "loading the text encoders and VAE", "this machine cannot hold them", allow_large)
    options = {k: v for k, v in index.items() if k.startswith("force_") or k.startswith("requires_")}
    if prompts is None:
        prompts = read_prompts(folder / PROMPTS_FILE) if (folder / PROMPTS_FILE).is_file() else ()
    return Stages(
        text_encoders=tuple(_transformers_model(folder / n, c, weights[n]) for n, c in encoders),
        tokenizers=tuple(_tokenizer(folder / n, c) for n, c in tokenizers),
        vae=_vae(folder / vae[0][0], vae[0][1], weights[vae[0][0]]) if vae else None,
        prompts=prompts,
        options=options,
    )


def _transformers_model(path: Path, class_name: str, files: WeightFiles) -> nn.Module:
    """A transformers encoder from exactly `files` (pickled .bin read by transformers with weights_only)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        model = getattr(transformers, class_name).from_pretrained(
            str(path), use_safetensors=files.safetensors, variant=files.variant, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad folder
        raise LoadError(f"{path}: cannot load {class_name} ({one_line(str(exc), 300)})") from None
    return _checked(model.eval().requires_grad_(False), path)


def _tokenizer(path: Path, class_name: str) -> Any:
    import transformers

    try:
        return getattr(transformers, class_name).from_pretrained(str(path))
    except Exception as exc:
        raise LoadError(f"{path}: cannot load {class_name} ({one_line(str(exc), 300)})") from None


def _vae(path: Path, class_name: str, files: WeightFiles) -> nn.Module:
    """A diffusers VAE from exactly `files` (pickled .bin read by diffusers with weights_only)."""
    import diffusers

    try:
        model = getattr(diffusers, class_name).from_pretrained(
            str(path),
            use_safetensors=files.safetensors,
            variant=files.variant,
            dtype=torch.float32,
            low_cpu_mem_usage=False,
        )
    except Exception as exc:
        raise LoadError(f"{path}: cannot load {class_name} ({one_line(str(exc), 300)})") from None
    return _checked(model.eval().requires_grad_(False), path)


def _checked(model: nn.Module, path: Path) -> nn.Module:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise LoadError(f"{path}: weight '{name}' holds NaN/Inf values; refusing a broken model")
    return model


def read_prompts(path: Path) -> tuple[str, ...]:
    """A prompt set: one prompt per line (UTF-8, blank lines and '#' comments skipped)."""
    try:
        if require_regular_file(path, "prompts file").st_size > MAX_PROMPTS * MAX_PROMPT_CHARS:
            raise ConfigError(f"{path}: too large for a prompts file")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read prompts ({one_line(str(exc))})") from None
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ConfigError(f"{path}: the prompts file holds no prompts")
    if len(prompts) > MAX_PROMPTS or any(len(p) > MAX_PROMPT_CHARS for p in prompts):
        raise ConfigError(f"{path}: at most {MAX_PROMPTS:,} prompts of at most {MAX_PROMPT_CHARS:,} characters")
    return prompts


class LatentDecoder(nn.Module):
    """Latents -> images in [-1, 1]: the VAE decoder with the pipeline's latent scaling (SD3/Flux also shift)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale + self.shift, return_dict=False)[0]


def image_shape(program: Any) -> tuple[int, ...]:
    """The shape of one output image: the decoded one of a latent pipeline, else the sample's."""
    stages, shape = program.stages, tuple(program.spec.sample_shape)
    if stages.vae is None:
        return shape
    return (int(stages.vae.config.out_channels), shape[1] * stages.vae_scale, shape[2] * stages.vae_scale)


def decoder(stages: Stages) -> nn.Module | None:
    """The output stage: None for a pixel-space program."""
    return None if stages.vae is None else LatentDecoder(stages.vae).eval()


def decode(stages: Stages, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Final samples -> images in [-1, 1] (pixel-space programs: unchanged)."""
    module = decoder(stages)
    if module is None:
        return latents
    with torch.inference_mode():  # float32 images on the host, whatever the VAE's placement
        return torch.cat([from_module(module(*at_module(module, (part,)))).cpu() for part in latents.split(batch)])
