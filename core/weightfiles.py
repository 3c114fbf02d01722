"""The weight files of a diffusers or transformers component folder, chosen as its library chooses them.

One file or shards listed by an index (`*.safetensors.index.json`: SDXL, SD3 and Flux ship sharded), the
plain files or a `variant` (`diffusion_pytorch_model.fp16.safetensors`, its shards
`diffusion_pytorch_model.fp16-00001-of-00002.safetensors` listed by `*.safetensors.index.fp16.json`),
safetensors before pickled `.bin` (which every loader here reads with `weights_only=True`). Without a
variant asked for, the plain files if the folder has them (diffusers' own default), else its only variant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import LoadError
from core.fileio import require_regular_file
from core.validate import read_json_object

# Base file names by library and format.
DIFFUSERS = {"safetensors": "diffusion_pytorch_model", "bin": "diffusion_pytorch_model"}
TRANSFORMERS = {"safetensors": "model", "bin": "pytorch_model"}
MAX_SHARDS = 10_000
VARIANT = re.compile(r"[A-Za-z0-9_]{1,32}")


@dataclass(frozen=True)
class WeightFiles:
    files: tuple[Path, ...]  # every file the library reads: the index first when sharded, then the weights
    weights: tuple[Path, ...]  # the tensor files alone
    variant: str | None
    safetensors: bool

    def describe(self) -> str:
        kind = "safetensors" if self.safetensors else "pickled .bin, read with weights_only"
        shards = f", {len(self.weights)} shards" if len(self.weights) > 1 else ""
        return f"{'variant ' + self.variant if self.variant else 'plain files'} ({kind}{shards})"


def _single(base: str, fmt: str, variant: str | None) -> str:
    return f"{base}.{variant}.{fmt}" if variant else f"{base}.{fmt}"


def _index(base: str, fmt: str, variant: str | None) -> str:
    return f"{base}.{fmt}.index.{variant}.json" if variant else f"{base}.{fmt}.index.json"


def variants(folder: Path, bases: dict[str, str]) -> set[str | None]:
    """The variants a folder holds weights for (None: the plain files)."""
    found: set[str | None] = set()
    for fmt, base in bases.items():
        b, f = re.escape(base), re.escape(fmt)
        patterns = (
            rf"{b}\.{f}",
            rf"{b}\.{f}\.index\.json",
            rf"{b}\.(?P<v>{VARIANT.pattern})\.{f}",
            rf"{b}\.{f}\.index\.(?P<v>{VARIANT.pattern})\.json",
        )
        for entry in folder.iterdir():
            for pattern in patterns:
                if match := re.fullmatch(pattern, entry.name):
                    found.add(match.groupdict().get("v"))
    return found


def resolve(folder: Path, bases: dict[str, str], variant: str | None = None) -> WeightFiles:
    """The files a component's library reads for `variant` (None: the plain files, or the folder's only
    variant), safetensors first; every one a regular file inside the folder."""
    if variant is not None and not VARIANT.fullmatch(variant):
        raise LoadError(f"--variant must be letters, digits or '_' (like fp16), got {variant!r}")
    present = variants(folder, bases)
    if variant is None and None not in present:
        named = sorted(v for v in present if v)
        if len(named) > 1:
            held = ", ".join(named)
            raise LoadError(f"{folder}: holds the variants {held} and no plain weights; choose one with --variant")
        variant = named[0] if named else None
    if variant not in present:
        held = ", ".join(sorted("plain" if v is None else v for v in present)) or "none"
        what = f"variant '{variant}'" if variant else "plain weights"
        raise LoadError(f"{folder}: no {what} ({', '.join(dict.fromkeys(bases.values()))}; weights held: {held})")
    for fmt in ("safetensors", "bin"):
        base = bases[fmt]
        single = folder / _single(base, fmt, variant)
        if single.exists():
            require_regular_file(single, "weights file", LoadError)
            return WeightFiles((single,), (single,), variant, fmt == "safetensors")
        index = folder / _index(base, fmt, variant)
        if index.exists():
            require_regular_file(index, "weights index", LoadError)
            shards = _shards(index, folder)
            return WeightFiles((index, *shards), shards, variant, fmt == "safetensors")
    raise LoadError(f"{folder}: no weights for {'variant ' + variant if variant else 'the plain files'}")


def _shards(index: Path, folder: Path) -> tuple[Path, ...]:
    """The shard files an index's weight_map names, each a plain name of a regular file in the folder."""
    data = read_json_object(index, LoadError, "weights index", constants=True)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoadError(f"{index}: no weight_map")
    names = sorted(set(weight_map.values()))
    if len(names) > MAX_SHARDS or not all(isinstance(n, str) for n in names):
        raise LoadError(f"{index}: weight_map must name at most {MAX_SHARDS:,} shard files")
    shards = []
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise LoadError(f"{index}: shard '{name}' is not a file name inside the folder")
        shard = folder / name
        if not shard.exists():
            raise LoadError(f"{index}: names shard '{name}', which is missing")
        require_regular_file(shard, "weights shard", LoadError)
        shards.append(shard)
    return tuple(shards)
