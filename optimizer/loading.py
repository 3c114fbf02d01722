"""Load a DiffusionProgram from our checkpoint format or a diffusers folder, safely.

Weights come from safetensors, or from torch files with `weights_only=True`: a pickle that would run
code is refused. Nothing is ever written next to the input.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_for
from .checkpoint import FORMAT, sidecar_path
from .errors import LoadError
from .ir import Conditioning, DiffusionProgram, SamplingPlan, Source
from .sampling import with_scheduler

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEFAULT_SAMPLING = {"scheduler": "dpmsolver++", "num_inference_steps": 20, "guidance_scale": 2.0}
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_program(path: str | Path) -> DiffusionProgram:
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{p}: no such file or directory")
    if p.is_dir():
        return _load_diffusers(p)
    if p.suffix == ".json":
        p = _weights_for_sidecar(p)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise LoadError(f"{p}: unsupported file type '{p.suffix}' (expected {', '.join(WEIGHT_SUFFIXES)} or a folder)")
    return _load_checkpoint(p)


def _weights_for_sidecar(sidecar: Path) -> Path:
    for suffix in WEIGHT_SUFFIXES:
        if (candidate := sidecar.with_suffix(suffix)).exists():
            return candidate
    raise LoadError(f"{sidecar}: no weights file beside it ({', '.join(WEIGHT_SUFFIXES)})")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return data


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file, refusing executable pickles."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoadError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LoadError(
            f"{path}: refused, the pickle holds objects other than tensors ({first}); "
            "convert it to safetensors from a trusted environment"
        ) from None
    except Exception as exc:  # zip/EOF/stream errors from a damaged file
        raise LoadError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoadError(f"{path}: expected a state dict of tensors")
    return data


def file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def _load_checkpoint(weights: Path) -> DiffusionProgram:
    sidecar = sidecar_path(weights)
    if not sidecar.exists():
        raise LoadError(f"{weights}: missing config '{sidecar.name}' beside it (our checkpoints are weights + JSON)")
    meta = read_json(sidecar)
    if meta.get("format") != FORMAT:
        raise LoadError(f"{sidecar}: not a {FORMAT} config (format={meta.get('format')!r})")
    model_meta = meta.get("model")
    if not isinstance(model_meta, dict) or not isinstance(model_meta.get("config"), dict):
        raise LoadError(f"{sidecar}: missing 'model.class' / 'model.config'")
    cond = meta.get("conditioning")
    conditioning = Conditioning(int(cond["num_classes"]), cond.get("null_class")) if cond else None
    return _assemble(
        model_class=str(model_meta.get("class")),
        config=model_meta["config"],
        state=read_weights(weights),
        scheduler=meta.get("scheduler") or {"class": "DDPMScheduler", "config": {}},
        sampling=meta.get("sampling") or DEFAULT_SAMPLING,
        conditioning=conditioning,
        source=Source(str(weights), "checkpoint", file_digest([weights, sidecar])),
    )


def _load_diffusers(folder: Path) -> DiffusionProgram:
    """A `save_pretrained` model folder, or a pipeline folder (model_index.json) with transformer/ or unet/."""
    scheduler = {"class": "DDPMScheduler", "config": {}}
    model_dir = folder
    if (folder / "model_index.json").exists():
        index = read_json(folder / "model_index.json")
        component = next((c for c in ("transformer", "unet") if c in index), None)
        if component is None:
            raise LoadError(f"{folder}: pipeline has no 'transformer' or 'unet' component")
        model_dir = folder / component
        if (folder / "scheduler" / "scheduler_config.json").exists():
            sched = read_json(folder / "scheduler" / "scheduler_config.json")
            scheduler = {"class": sched.get("_class_name", "DDPMScheduler"), "config": sched}
    if not (model_dir / "config.json").exists():
        raise LoadError(f"{folder}: not a diffusers folder (no config.json or model_index.json)")
    config = read_json(model_dir / "config.json")
    weights = next((model_dir / n for n in DIFFUSERS_WEIGHTS if (model_dir / n).exists()), None)
    if weights is None:
        raise LoadError(f"{model_dir}: no weights ({' or '.join(DIFFUSERS_WEIGHTS)})")
    return _assemble(
        model_class=str(config.get("_class_name")),
        config=config,
        state=read_weights(weights),
        scheduler=scheduler,
        sampling=DEFAULT_SAMPLING,
        conditioning=None,
        source=Source(str(folder), "diffusers", file_digest([model_dir / "config.json", weights])),
    )


def _assemble(
    model_class: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    scheduler: dict[str, Any],
    sampling: dict[str, Any],
    conditioning: Conditioning | None,
    source: Source,
) -> DiffusionProgram:
    adapter = adapter_for(model_class)
    model = adapter.build(config)
    _check_shapes(model, state, source)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise LoadError(
            f"{source.path}: weights do not fit the {model_class} config "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    return program_from_model(model, scheduler, sampling, conditioning, source)


def program_from_model(
    model: torch.nn.Module,
    scheduler: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
    conditioning: Conditioning | None = None,
    source: Source | None = None,
) -> DiffusionProgram:
    """Wrap an in-memory diffusers model (DiTTransformer2DModel / UNet2DModel) as a program."""
    adapter = adapter_for(type(model).__name__)
    scheduler = scheduler or {"class": "DDPMScheduler", "config": {}}
    sampling = sampling or DEFAULT_SAMPLING
    model.eval().requires_grad_(False)
    base = SamplingPlan(
        str(scheduler.get("class")),
        {k: v for k, v in scheduler.get("config", {}).items() if not k.startswith("_")},
        int(sampling.get("num_inference_steps", 20)),
        float(sampling.get("guidance_scale", 1.0)),
    )
    plan = with_scheduler(base, str(sampling.get("scheduler", base.scheduler_class)))
    spec = adapter.spec(model, conditioning, plan.scheduler_config.get("prediction_type", "epsilon"))
    if not spec.conditioning.supports_guidance and plan.guidance_scale > 1:
        plan = SamplingPlan(plan.scheduler_class, plan.scheduler_config, plan.num_inference_steps, 1.0)
    return DiffusionProgram(denoiser=model, spec=spec, plan=plan, source=source or Source("<memory>", "memory", ""))


def _check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Source) -> None:
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise LoadError(
            f"{source.path}: weight shapes do not fit the config, e.g. {bad[0]}: "
            f"{tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}"
        )
