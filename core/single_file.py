"""Single-file checkpoints (`model.safetensors` / `model.ckpt` from A1111, ComfyUI or CivitAI): the original
(LDM / BFL / SAI) key layout of a whole pipeline in one file.

The family is detected from the keys and shapes as diffusers' single-file loader detects it
(`infer_diffusers_model_type`), and the pipeline is built by diffusers' own `from_single_file` with
`config=` a diffusers folder of that family's configs and tokenizers (no weights) and `local_files_only=True`:
offline by construction. The folder is the user's `--config`, or, for the SD 1.x, SD 2.x and SDXL base
layouts, the configs shipped here (`single_file_configs/`: the JSON of the hub repos diffusers itself would
fetch) with the tokenizers of the local Hugging Face cache (a vocabulary is data, not a config: not shipped).
Pickled `.ckpt` files are read by diffusers with `torch.load(weights_only=True)`; a zip whose entries declare
more than they could hold is refused first. The converted pipeline is written to a temporary diffusers folder
and loaded from there like any other.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from core import diffusers_folder, limits
from core.errors import LoadError, one_line
from core.fileio import require_regular_file

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# diffusers' model types (infer_diffusers_model_type) -> the pipeline class that loads them.
PIPELINES = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline",
    "sd35_large": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}
# A key the denoiser of each layout has (diffusers' detection alone names any unknown layout "v1").
MARKERS = {name: "diffusion_model.input_blocks.0.0.weight" for name in ("v1", "v2", "xl_base")}
MARKERS |= {name: "joint_blocks.0." for name in ("sd3", "sd35_medium", "sd35_large")}
MARKERS |= {name: "double_blocks.0." for name in ("flux-dev", "flux-schnell")}
MAX_KEYS = 100_000
# Configs shipped in-tree, and the hub repo whose configs and tokenizers they are (diffusers'
# DIFFUSERS_DEFAULT_PIPELINE_PATHS: what its from_single_file fetches for the layout).
SHIPPED = Path(__file__).with_name("single_file_configs")
HUB_REPOS = {
    "v1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "v2": "stabilityai/stable-diffusion-2-1",
    "xl_base": "stabilityai/stable-diffusion-xl-base-1.0",
}


class Converted(NamedTuple):
    """A converted single file: its diffusers model type, the program, and what it was converted with."""

    found: str
    program: Any
    configs: str
    config_files: tuple[Path, ...]


def keys_and_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors (names, shapes, dtypes), read without loading the data:
    the safetensors header, or a zip checkpoint mapped (mmap) after its entries were checked."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                if len(names) > MAX_KEYS:
                    raise LoadError(f"{path}: {len(names):,} tensors is more than any diffusion checkpoint holds")
                out = {}
                for name in names:
                    part = f.get_slice(name)
                    out[name] = torch.empty(part.get_shape(), dtype=_dtype(part.get_dtype()), device="meta")
                return out
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoadError(f"{path}: corrupt or truncated safetensors file ({one_line(exc)})") from None
    check_zip(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # the safe unpickler's refusal, or a damaged file
        why = f"{type(exc).__name__}: {one_line(str(exc).split('. ')[0], 200)}"
        raise LoadError(f"{path}: refused or unreadable checkpoint ({why})") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{path}: expected a state dict of tensors")
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}


def _dtype(name: str) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    table |= {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32}
    return table.get(name, torch.uint8)


def check_zip(path: Path) -> None:
    """A torch zip checkpoint stores its entries uncompressed: an entry that is compressed, or entries that
    declare more bytes than the file holds, are a zip bomb, refused before anything is decompressed."""
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise LoadError(f"{path}: corrupt zip checkpoint ({one_line(exc)})") from None
    declared = sum(e.file_size for e in entries)
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed or declared > size:
        what = f"entry {packed[0]!r} is compressed" if packed else f"its entries declare {declared:,} bytes"
        raise LoadError(f"{path}: {what}, in a {size:,}-byte file (torch stores checkpoints uncompressed); refused")


def model_type(keys: dict[str, torch.Tensor], path: Path) -> str:
    """diffusers' model type of the checkpoint, one of PIPELINES."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        found = infer_diffusers_model_type(keys)
    except Exception:  # a layout diffusers' detection trips over
        found = None
    if found in PIPELINES and not any(MARKERS[found] in k for k in keys):
        found = None  # diffusers falls back to "v1" for any layout it does not know
    if found not in PIPELINES:
        sample = ", ".join(sorted(keys)[:3])
        raise LoadError(
            f"{path}: not a single-file layout this tool loads (detected {found!r}; keys like {sample}; "
            f"known: {', '.join(PIPELINES)}), nor one of ours (missing config '{path.stem}.json' beside it)"
        )
    return found


def load(path: Path, config: Path | None, allow_large: bool, load_folder: Callable[[Path], Any]) -> Converted:
    """The program of a single-file checkpoint: detected, converted by diffusers with `config` (default: the
    shipped configs of its layout), loaded by `load_folder` from a temporary diffusers folder (removed once
    the program holds everything)."""
    import diffusers

    require_regular_file(path, "checkpoint", LoadError)
    found = model_type(keys_and_shapes(path), path)
    pipeline = PIPELINES[found]
    if config is not None and not (config / "model_index.json").is_file():
        raise LoadError(f"--config {config}: not a diffusers pipeline folder (no model_index.json)")
    size = path.stat().st_size
    what = f"converting {path.name} ({size / limits.GIB:.1f} GiB)"
    limits.require_memory(4 * size, what, "this machine cannot hold the model", allow_large)
    kwargs: dict[str, Any] = {"safety_checker": None} if pipeline == "StableDiffusionPipeline" else {}
    with tempfile.TemporaryDirectory(prefix="optimize-single-file-") as tmp:
        if config is None:
            folder, files = shipped_configs(found, path, Path(tmp) / "configs")
            configs = f"the shipped {found} configs and the cached tokenizers of {HUB_REPOS[found]}"
        else:
            folder, files = local_configs(config, Path(tmp) / "configs")
            configs = f"--config {config}"
        try:
            pipe = getattr(diffusers, pipeline).from_single_file(
                str(path), config=str(folder), local_files_only=True, dtype=torch.float32, **kwargs
            )
        except Exception as exc:  # diffusers raises many types for a checkpoint that does not fit its config
            why = one_line(exc, 300)
            raise LoadError(f"{path}: diffusers cannot load it as {pipeline} with {configs} ({why})") from None
        converted = Path(tmp) / "pipeline"
        pipe.save_pretrained(converted)
        if config is not None and (config / "prompts.txt").is_file():
            (converted / "prompts.txt").write_bytes((config / "prompts.txt").read_bytes())
        return Converted(found, load_folder(converted), configs, files)


def local_configs(config: Path, into: Path) -> tuple[Path, tuple[Path, ...]]:
    """The --config folder's configs and vocabularies copied (its weights, if any, are not read), and the files
    copied. A transformers config's `torch_dtype` is dropped: transformers builds the encoder in that dtype
    before the checkpoint's values are loaded into it, which rounds an fp32 checkpoint's weights to the
    hub config's float16 (SDXL's text_encoder_2); built in float32, every stored value is kept."""
    files = [config / "model_index.json"]
    for sub in sorted(s for s in config.iterdir() if s.is_dir()):
        files += diffusers_folder.config_files(sub)
    for file in files:
        target = into / file.relative_to(config)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        if file.name == "config.json" and file.parent != config:
            data = diffusers_folder.read_third_party_json(target)
            if "model_type" in data:
                target.write_text(json.dumps({k: v for k, v in data.items() if k not in ("torch_dtype", "dtype")}))
    return into, tuple(files)


def shipped_configs(found: str, path: Path, into: Path) -> tuple[Path, tuple[Path, ...]]:
    """A config folder for `found` without --config, and the files it was made of: the shipped configs, with
    the tokenizers of the layout's hub repo from the local Hugging Face cache (read offline; never fetched)."""
    if found not in HUB_REPOS:
        raise LoadError(
            f"{path}: a single-file {found} checkpoint ({PIPELINES[found]}): configs are shipped for "
            f"{', '.join(HUB_REPOS)} only; pass --config DIR, a local diffusers folder of its family (configs and"
            " tokenizers; weights not needed)"
        )
    shutil.copytree(SHIPPED / found, into)
    index = json.loads((into / "model_index.json").read_text())
    names = sorted(name for name in index if name.startswith("tokenizer"))
    cached = _cached_snapshot(HUB_REPOS[found], names)
    if cached is None:
        raise LoadError(
            f"{path}: a single-file {found} checkpoint carries no tokenizer, and the Hugging Face cache holds none"
            f" of {HUB_REPOS[found]} ({', '.join(names)}; a vocabulary, not shipped here): pass --config DIR, a local"
            " diffusers folder of its family (configs and tokenizers; weights not needed)"
        )
    for name in names:
        shutil.copytree(cached / name, into / name)
    files = [*(SHIPPED / found).rglob("*.json"), *(f for n in names for f in (cached / n).iterdir() if f.is_file())]
    return into, tuple(sorted(files))


def _cached_snapshot(repo: str, names: list[str]) -> Path | None:
    """The cached snapshot of `repo` holding the `names` folders, or None; local files only."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, allow_patterns=[f"{n}/*" for n in names], local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError: not cached
        return None
    return folder if all((folder / n).is_dir() for n in names) else None
