"""The pipeline's stages around the denoiser in an artifact: tokenizers (saved as the pipeline's own
files), the prompt encoder and the VAE decoder as ONNX graphs, and their section of plan.json.

A served text-to-image artifact runs: tokenizers -> prompt_encoder.onnx -> the denoiser loop ->
decoder.onnx. Neither stage is optimized unless a pass says so; both are verified with the whole loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from core.adapters import adapter_for
from core.adapters.text import TextAdapter
from core.errors import LoadError
from core.fileio import recorded_file, sha256_files
from core.ir import DiffusionProgram, Stages
from core.stages import TOKENIZER_CLASSES, TOKENIZERS, decoder
from core.validate import get, of_type

from .onnx_export import export_graph

PROMPT_ENCODER_FILE, DECODER_FILE = "prompt_encoder.onnx", "decoder.onnx"
MAX_TOKENIZER_FILE_BYTES = 256 << 20  # vocabularies are a few MB
LATENTS, IMAGE = "latents", "image"


def lower_stages(program: DiffusionProgram, folder: Path, files: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Write the stages of `program` into `folder`; returns plan.json's "stages" section ({} if none);
    `files(path)` records a graph's files (plan.graph_files)."""
    section: dict[str, Any] = {}
    stages, spec = program.stages, program.spec
    adapter = adapter_for(spec.model_class)
    if isinstance(adapter, TextAdapter):
        encoder = adapter.prompt_encoder(stages, spec.model_config)
        tokens = adapter.tokenize(stages, ["", "a"])
        path = folder / PROMPT_ENCODER_FILE
        export_graph(encoder, tuple(tokens.values()), list(tokens), list(spec.conditioning.input_names), path)
        tokenizers = []
        for name, tokenizer, length in zip(TOKENIZERS, stages.tokenizers, adapter.lengths(stages), strict=False):
            tokenizer.save_pretrained(str(folder / name))
            hashes = {p.name: sha256_files([p]) for p in sorted((folder / name).iterdir())}
            kind = type(tokenizer).__name__
            tokenizers.append({"folder": name, "class": kind, "max_length": length, "files": hashes})
        section["prompt_encoder"] = {
            **files(path),
            "inputs": list(tokens),
            "outputs": list(spec.conditioning.input_names),
            "tokenizers": tokenizers,
            "zero_uncond": adapter.zero_uncond(stages),
        }
    module = decoder(stages)
    if module is not None:
        path = folder / DECODER_FILE
        export_graph(module, (torch.zeros(2, *spec.sample_shape),), [LATENTS], [IMAGE], path)
        section["decoder"] = {**files(path), "inputs": [LATENTS], "outputs": [IMAGE]}
    return section


def read_stages(doc: dict[str, Any], folder: Path, where: str, check_graph: Callable[..., None]) -> dict[str, Any]:
    """Check plan.json's "stages" section: graphs as the denoiser's are checked, tokenizer folders
    named directly inside the artifact with a known class, holding exactly the files recorded (regular
    files, no links, each with its recorded sha256), so a tokenizer loads nothing else."""
    stages = get(doc, "stages", dict, where, {}, error=LoadError)
    for name in stages:
        if name not in ("prompt_encoder", "decoder"):
            raise LoadError(f"{where}: unknown stage '{name}'")
        check_graph(folder, name, of_type(stages[name], dict, f"{where}: stages.{name}", LoadError), where)
    encoder = stages.get("prompt_encoder")
    if encoder is not None:
        for i, tok in enumerate(get(encoder, "tokenizers", list, f"{where}: stages.prompt_encoder", error=LoadError)):
            tok = of_type(tok, dict, f"{where}: tokenizers[{i}]", LoadError)
            name = get(tok, "folder", str, f"{where}: tokenizers[{i}]", error=LoadError)
            if name not in TOKENIZERS or not (folder / name).is_dir() or (folder / name).is_symlink():
                raise LoadError(f"{where}: tokenizer folder {name!r} is not a tokenizer folder inside the artifact")
            if get(tok, "class", str, f"{where}: tokenizers[{i}]", error=LoadError) not in TOKENIZER_CLASSES:
                raise LoadError(
                    f"{where}: tokenizer class {tok['class']!r} is not one of {', '.join(TOKENIZER_CLASSES)}"
                )
            _check_tokenizer_files(folder / name, get(tok, "files", dict, f"{where}: tokenizers[{i}]", error=LoadError))
    return stages


def _check_tokenizer_files(folder: Path, files: dict[str, Any]) -> None:
    where = f"tokenizer folder {folder}"
    present = {entry.name for entry in folder.iterdir()}
    if not files or present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        raise LoadError(f"{where}: holds {extra or 'nothing'} not recorded in plan.json, lacks {missing or 'nothing'}")
    for name, digest in files.items():
        recorded_file(folder, name, digest, where, MAX_TOKENIZER_FILE_BYTES)


class StageRunner:
    """Runs an artifact's prompt encoder and decoder graphs (`open_graph(path)` -> a session-like
    callable: {input name: array} -> [arrays]) with the tokenizers saved beside them."""

    def __init__(self, folder: Path, section: dict[str, Any], model_class: str, open_graph: Callable) -> None:
        import transformers

        self.section = section
        self.adapter = adapter_for(model_class)
        encoder = section.get("prompt_encoder")
        self.encoder = open_graph(folder / encoder["file"]) if encoder else None
        self.decoder = open_graph(folder / section["decoder"]["file"]) if "decoder" in section else None
        tokenizers = ()
        if encoder:
            tokenizers = tuple(
                getattr(transformers, t["class"]).from_pretrained(str(folder / t["folder"]))
                for t in encoder["tokenizers"]
            )
        self.stages = Stages(tokenizers=tokenizers)

    @property
    def zero_uncond(self) -> bool:
        return bool(self.section.get("prompt_encoder", {}).get("zero_uncond", False))

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """prompts -> the condition tensors, through the tokenizers and the prompt encoder graph."""
        if self.encoder is None or not isinstance(self.adapter, TextAdapter):
            raise LoadError("this artifact has no prompt encoder")
        tokens = self.adapter.tokenize(self.stages, prompts)
        outputs = self.encoder({k: v.numpy() for k, v in tokens.items()})
        names = self.section["prompt_encoder"]["outputs"]
        return {n: torch.from_numpy(o) for n, o in zip(names, outputs, strict=True)}

    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Final samples -> images in [-1, 1] (no decoder: unchanged)."""
        if self.decoder is None:
            return latents
        return torch.cat([torch.from_numpy(self.decoder({LATENTS: z.numpy()})[0]) for z in latents.split(batch)])
