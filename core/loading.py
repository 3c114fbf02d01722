"""Load a DiffusionProgram from our checkpoint format or a diffusers folder, safely.

Weights come from safetensors, or from torch files with `weights_only=True`: a pickle that would run
code is refused. Every field of a sidecar or config is type- and range-checked, the model's cost is
estimated on the meta device before it is built (see limits), and weights holding NaN/Inf are refused.
Nothing is ever written next to the input.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from core import diffusers_folder, lerobot_folder, limits, schedulers, single_file
from core.adapters import adapter_for
from core.adapters.text import TextAdapter
from core.checkpoint import FORMAT, WEIGHT_SUFFIXES, sidecar_path
from core.errors import ConfigError, LoadError, one_line
from core.fileio import sha256_files
from core.footprint import footprint
from core.ir import Conditioning, DiffusionProgram, SamplingPlan, Source, Stages
from core.outputs import resolve
from core.placement import Placement, place_modules
from core.schedulers import check_plan, is_flow, with_scheduler
from core.stages import load_stages
from core.validate import finite_tree, get, integer, number, read_json_object

DEFAULT_SAMPLING = {"scheduler": "dpmsolver++", "num_inference_steps": 20, "guidance_scale": 2.0}
DEFAULT_SCHEDULER = {"class": "DDPMScheduler", "config": {}}
MAX_GUIDANCE = 1000.0
LARGE_ADVICE = "this machine cannot hold the model"


def load_program(
    path: str | Path,
    allow_large: bool = False,
    prompts: tuple[str, ...] | None = None,
    variant: str | None = None,
    config: Path | None = None,
) -> DiffusionProgram:
    """`prompts`: the prompt set of a text-conditioned model (default: its pipeline folder's prompts.txt);
    `variant`: a diffusers folder's weight variant (`fp16` reads `*.fp16.safetensors`; default: the plain
    files, or the folder's only variant); `config`: the local diffusers folder a single-file checkpoint is
    converted with (core.single_file)."""
    p = Path(path)
    resolved = resolve(p, "model")
    if not resolved.exists():
        raise LoadError(f"{p}: no such file or directory")
    if resolved.is_dir():
        if lerobot_folder.is_policy(resolved):
            return _load_lerobot(p, allow_large)
        return _load_diffusers(p, allow_large, prompts, variant)
    if not resolved.is_file():
        raise LoadError(f"{p}: not a regular file or a folder")
    if p.suffix == ".json":
        p = _weights_for_sidecar(p)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise LoadError(f"{p}: unsupported file type '{p.suffix}' (expected {', '.join(WEIGHT_SUFFIXES)} or a folder)")
    if p.suffix in single_file.SUFFIXES and not sidecar_path(p).exists():
        return _load_single_file(p, config, allow_large, prompts)
    return _load_checkpoint(p, allow_large)


def _load_single_file(
    path: Path, config: Path | None, allow_large: bool, prompts: tuple[str, ...] | None
) -> DiffusionProgram:
    """A single-file checkpoint, converted by diffusers (core.single_file); its source is the file and the
    config files it was converted with, hashed, never the temporary folder it was converted into."""
    converted = single_file.load(
        path, config, allow_large, lambda folder: _load_diffusers(folder, allow_large, prompts, None)
    )
    how = f"converted by diffusers' from_single_file with {converted.configs}"
    notes = (f"single-file {converted.found} checkpoint, {how}",)
    notes += tuple(n for n in converted.program.source.notes if "optimize-single-file-" not in n)
    source = Source(str(path), "single-file", file_digest([path, *converted.config_files]), notes)
    return converted.program.replace(source=source)


def _weights_for_sidecar(sidecar: Path) -> Path:
    for suffix in WEIGHT_SUFFIXES:
        if (candidate := sidecar.with_suffix(suffix)).exists():
            return candidate
    raise LoadError(f"{sidecar}: no weights file beside it ({', '.join(WEIGHT_SUFFIXES)})")


def read_json(path: Path) -> dict[str, Any]:
    """Our own JSON (a sidecar): strict, no NaN/Infinity."""
    return read_json_object(path, LoadError, "JSON")


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
        raise LoadError(
            f"{path}: refused, the pickle holds objects other than tensors ({_unpickler_reason(exc)}); "
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
    return sha256_files(paths)[:16]


def _load_checkpoint(weights: Path, allow_large: bool) -> DiffusionProgram:
    sidecar = sidecar_path(weights)
    if not sidecar.exists():
        raise LoadError(f"{weights}: missing config '{sidecar.name}' beside it (our checkpoints are weights + JSON)")
    meta = read_json(sidecar)
    where = str(sidecar)
    if meta.get("format") != FORMAT:
        raise LoadError(f"{where}: not a {FORMAT} config (format={meta.get('format')!r})")
    model_meta = get(meta, "model", dict, where, error=LoadError)
    cond = get(meta, "conditioning", (dict, type(None)), where, default=None, error=LoadError)
    environment = get(meta, "environment", (str, type(None)), where, default=None, error=LoadError)
    return _assemble(
        model_class=get(model_meta, "class", str, f"{where}: model", error=LoadError),
        config=get(model_meta, "config", dict, f"{where}: model", error=LoadError),
        weights=(weights,),
        scheduler=get(meta, "scheduler", (dict, type(None)), where, default=None, error=LoadError) or DEFAULT_SCHEDULER,
        sampling=get(meta, "sampling", (dict, type(None)), where, default=None, error=LoadError) or DEFAULT_SAMPLING,
        conditioning=None if cond is None else _conditioning(cond, f"{where}: conditioning"),
        hash_source=lambda: Source(str(weights), "checkpoint", file_digest([weights, sidecar])),
        where=where,
        allow_large=allow_large,
        stages=Stages(environment=environment),
    )


def _conditioning(data: dict[str, Any], where: str) -> Conditioning:
    try:
        return Conditioning.from_dict(data, where)
    except ConfigError as exc:
        raise LoadError(str(exc)) from None


def _load_diffusers(
    folder: Path, allow_large: bool, prompts: tuple[str, ...] | None, variant: str | None
) -> DiffusionProgram:
    """A `save_pretrained` model folder, or a pipeline folder (model_index.json) with transformer/ or unet/,
    its scheduler, text encoders, tokenizers, VAE and prompt set (core.diffusers_folder)."""
    found = diffusers_folder.read(folder, variant)
    stages = Stages()
    if found.index is not None:  # after diffusers_folder checked every file the stages' libraries read
        stages = load_stages(folder, found.index, allow_large, prompts, found.stage_weights)
    scheduler = found.scheduler or DEFAULT_SCHEDULER
    where = str(folder / "scheduler" / diffusers_folder.SCHEDULER_FILE) if found.scheduler else None
    return _assemble(
        model_class=found.model_class,
        config=found.config,
        weights=found.weights.weights,
        scheduler=scheduler,
        sampling=found.sampling or DEFAULT_SAMPLING,
        conditioning=None,
        hash_source=lambda: Source(str(folder), "diffusers", file_digest(list(found.digested)), found.notes),
        where=str(found.model_dir / "config.json"),
        scheduler_where=where,
        allow_large=allow_large,
        stages=stages,
    )


def _load_lerobot(folder: Path, allow_large: bool) -> DiffusionProgram:
    """A LeRobot diffusion-policy folder (core.lerobot_folder): its UNet, scheduler and normalization."""
    policy = lerobot_folder.read(folder)
    return _assemble(
        model_class="LeRobotDiffusionUnet",
        config=policy.config,
        weights=(folder / lerobot_folder.WEIGHTS,),
        scheduler=policy.scheduler,
        sampling=policy.sampling,
        conditioning=None,
        hash_source=lambda: Source(str(folder), "lerobot", file_digest(list(policy.files)), policy.notes),
        where=str(folder / lerobot_folder.CONFIG),
        allow_large=allow_large,
        stages=Stages(environment=policy.environment),
        rename=lerobot_folder.unet_weights,
    )


def _assemble(
    model_class: str,
    config: dict[str, Any],
    weights: tuple[Path, ...],
    scheduler: dict[str, Any],
    sampling: dict[str, Any],
    conditioning: Conditioning | None,
    hash_source: Callable[[], Source],
    where: str,
    allow_large: bool,
    stages: Stages | None = None,
    scheduler_where: str | None = None,
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> DiffusionProgram:
    """Check everything that is cheap to check, estimate the cost, then hash (`hash_source()`), build and load.
    `scheduler_where`: the file the scheduler came from (a pipeline's scheduler_config.json); `rename`: the
    file's state dict to the model's (a LeRobot policy's denoiser weights)."""
    adapter = adapter_for(model_class)
    finite_tree(config, f"{where}: config", LoadError)
    limits.check_caps(config, adapter.CAPS, f"{where}: config")
    timesteps = partial(adapter.timestep_plan, config) if isinstance(adapter, TextAdapter) else None
    plan = _plan(scheduler, sampling, scheduler_where or where, timesteps)
    fp = footprint(model_class, config)
    size = sum(f.stat().st_size for f in weights)
    need = 2 * max(fp.weight_bytes, size)  # the file's tensors + the model
    name = weights[0].name if len(weights) == 1 else f"{len(weights)} weight shards"
    what = f"loading {name} ({size / limits.GIB:.1f} GiB on disk, {fp.parameters:,} parameters by config)"
    limits.require_memory(need, what, LARGE_ADVICE, allow_large)
    source = hash_source()  # hashed only once the memory check let it load
    model = adapter.build(config)
    state = _read_all(weights)
    if rename is not None:
        state = rename(state)
    _check_shapes(model, state, source)
    stored = _as_model_dtypes(model, state, source.path)
    if stored:
        note = f"{Path(where).parent.name or 'the model'}: weights stored as {stored}, run in float32"
        source = dataclasses.replace(source, notes=(*source.notes, note))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise LoadError(
            f"{source.path}: weights do not fit the {model_class} config "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    true_cfg = sampling.get("true_cfg_scale")
    true_cfg = None if true_cfg is None else number(true_cfg, f"{where}: sampling.true_cfg_scale", 0.0, MAX_GUIDANCE)
    return _program(model, plan, conditioning, source, where, stages or Stages(), true_cfg)


def _plan(
    scheduler: dict[str, Any],
    sampling: dict[str, Any],
    where: str,
    timesteps: Callable[[SamplingPlan], SamplingPlan] | None = None,
) -> SamplingPlan:
    """The sampling plan of a sidecar/pipeline, every field checked and the scheduler built once.
    `timesteps`: the family's set_timesteps arguments (flow matching's shift) added to the plan."""
    scheduler_class = get(scheduler, "class", str, f"{where}: scheduler", error=LoadError)
    try:
        schedulers.scheduler_class(scheduler_class)
    except ConfigError as exc:
        raise LoadError(f"{where}: scheduler.class: {exc}") from None
    scheduler_config = get(scheduler, "config", dict, f"{where}: scheduler", {}, LoadError)
    steps = get(sampling, "num_inference_steps", object, f"{where}: sampling", 20, LoadError)
    guidance = get(sampling, "guidance_scale", object, f"{where}: sampling", 1.0, LoadError)
    name = get(sampling, "scheduler", str, f"{where}: sampling", scheduler_class, LoadError)
    base = SamplingPlan(
        scheduler_class,
        {k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        integer(steps, f"{where}: sampling.num_inference_steps", 1, limits.MAX_STEPS, LoadError),
        number(guidance, f"{where}: sampling.guidance_scale", 0.0, MAX_GUIDANCE, LoadError),
    )
    try:
        plan = with_scheduler(base, name)  # the explicit config, a class default -inf left out (explicit_config)
        finite_tree(plan.scheduler_config, "scheduler.config", ConfigError)
        if timesteps is not None:
            plan = timesteps(plan)
        check_plan(plan)
    except ConfigError as exc:
        raise LoadError(f"{where}: {exc}") from None
    return plan


def _program(
    model: torch.nn.Module,
    plan: SamplingPlan,
    conditioning: Conditioning | None,
    source: Source,
    where: str,
    stages: Stages,
    true_cfg: float | None = None,
) -> DiffusionProgram:
    """`true_cfg`: the pipeline's classifier-free guidance scale where it is not its guidance_scale (Flux)."""
    adapter = adapter_for(type(model).__name__)
    model.eval().requires_grad_(False)
    if isinstance(adapter, TextAdapter):
        if not stages.text_encoders:
            raise LoadError(
                f"{where}: {adapter.model_class} is text-conditioned; load its pipeline folder (text encoder)"
            )
        conditioning = adapter.text_conditioning(stages, dict(model.config))
    if conditioning is not None:
        adapter.check_conditioning(model, conditioning, where)
    prediction = "flow" if is_flow(plan) else plan.scheduler_config.get("prediction_type", "epsilon")
    prediction = "flow" if prediction == "flow_prediction" else prediction  # UniPC's name for it (Wan)
    spec = adapter.spec(model, conditioning, prediction)
    if adapter.embeds_guidance(model.config):
        # The pipeline's guidance_scale is the embedding's input; classifier-free guidance only at true_cfg_scale
        # (Flux) or none (an LCM UNet: diffusers' SD pipelines turn CFG off when time_cond_proj_dim is set).
        embedded = dataclasses.replace(spec.conditioning, embedded_guidance=plan.guidance_scale)
        spec = dataclasses.replace(spec, conditioning=embedded)
        plan = dataclasses.replace(plan, guidance_scale=true_cfg or 1.0)
    elif true_cfg is not None:
        plan = dataclasses.replace(plan, guidance_scale=true_cfg)
    if not spec.conditioning.supports_guidance and plan.guidance_scale > 1:
        plan = dataclasses.replace(plan, guidance_scale=1.0)
    return DiffusionProgram(denoiser=model, spec=spec, plan=plan, source=source, stages=stages)


def program_from_model(
    model: torch.nn.Module,
    scheduler: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
    conditioning: Conditioning | None = None,
    source: Source | None = None,
) -> DiffusionProgram:
    """Wrap an in-memory diffusers model (DiTTransformer2DModel / UNet2DModel) as a program."""
    plan = _plan(scheduler or DEFAULT_SCHEDULER, sampling or DEFAULT_SAMPLING, "<memory>")
    return _program(model, plan, conditioning, source or Source("<memory>", "memory", ""), "<memory>", Stages())


def _check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Source) -> None:
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise LoadError(
            f"{source.path}: weight shapes do not fit the config, e.g. {bad[0]}: "
            f"{tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}"
        )


def _read_all(files: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    """The state dict of one file or of every shard (a key held by two shards is refused)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = read_weights(path)
        twice = state.keys() & part.keys()
        if twice:
            raise LoadError(f"{path}: weight '{min(twice)}' is also in another shard")
        state.update(part)
        _check_finite(part, path)
    return state


def _as_model_dtypes(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> str:
    """Every weight cast to the model's float32 (float16, bfloat16 and float8 files upcast, as the report
    states), integer buffers kept; a weight of a kind the model cannot hold (integer, bool or complex where it
    has floats) refused. Returns the stored floating types other than float32, e.g. "float16" ("" if none)."""
    own = model.state_dict()
    stored = set()
    for key, value in state.items():
        target = own.get(key)
        if target is None or value.dtype == target.dtype:
            continue
        if target.is_floating_point() and value.is_floating_point():
            stored.add(str(value.dtype).removeprefix("torch."))
            state[key] = value.to(target.dtype)
        elif target.is_floating_point() or value.is_complex():
            kind = str(value.dtype).removeprefix("torch.")
            raise LoadError(f"{where}: weight '{key}' is {kind}; the model holds floating-point weights there")
    return ", ".join(sorted(stored))


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """NaN/Inf weights make every later number meaningless (and crash the Fréchet distance): refuse now;
    float64 weights beyond float32's range too (the model runs in float32, where they become Inf)."""
    top = torch.finfo(torch.float32).max
    for key, value in state.items():
        if value.is_complex():
            raise LoadError(f"{path}: weight '{key}' is complex; a diffusion model's weights are real")
        if not value.is_floating_point():
            continue
        wide = value if value.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else value.float()
        if not bool(torch.isfinite(wide).all()):  # float8 checked widened
            bad = int((~torch.isfinite(wide)).sum())
            raise LoadError(f"{path}: weight '{key}' holds {bad:,} NaN/Inf values; refusing a broken model")
        if value.dtype == torch.float64 and value.numel() and float(value.abs().max()) > top:
            bad = int((value.abs() > top).sum())
            raise LoadError(f"{path}: weight '{key}' holds {bad:,} values beyond float32's range; refusing it")


def _unpickler_reason(exc: Exception) -> str:
    """What the safe unpickler refused (e.g. 'Unsupported global: GLOBAL os.system'), without torch's
    advice to load the file unsafely, which we never give."""
    for line in str(exc).splitlines():
        if "Unsupported" in line or "WeightsUnpickler error" in line:
            return one_line(line.split("WeightsUnpickler error:")[-1].split(". ")[0], 160)
    return "a global the safe loader does not allow"


def place(program: DiffusionProgram, placement: Placement) -> DiffusionProgram:
    """The program with its modules (denoiser, text encoders, VAE) moved, in place, to `placement`'s
    device and dtype (core.placement): what `--device` / `--dtype` choose, right after loading."""
    if placement.device == "cuda" and "LOCAL_RANK" in os.environ:  # a torchrun rank: its own GPU
        placement = dataclasses.replace(placement, device=f"cuda:{int(os.environ['LOCAL_RANK'])}")
    stages = program.stages
    place_modules((program.denoiser, *stages.text_encoders, stages.vae), placement)
    stages.encoded.clear()  # prompt encodings of the old placement
    return program.replace(placement=placement)


def fp32_copy(program: DiffusionProgram) -> DiffusionProgram:
    """A float32 CPU copy of a placed program (what ONNX export reads: ONNX Runtime's CPU provider has no
    bfloat16 kernels); the program itself if it is float32 on the CPU already."""
    if program.placement.is_default:
        return program
    import copy

    stages = program.stages
    modules = copy.deepcopy((program.denoiser, stages.text_encoders, stages.vae))
    place_modules((modules[0], *modules[1], modules[2]), Placement())
    copied = dataclasses.replace(stages, text_encoders=modules[1], vae=modules[2], encoded={})
    return program.replace(denoiser=modules[0], stages=copied, placement=Placement())
