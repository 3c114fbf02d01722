"""A diffusers folder as its library reads it: a pipeline folder (model_index.json) or a model folder.

What the loader needs before it builds anything: the denoiser's folder and class (old hub configs name
`Transformer2DModel`, which diffusers remaps by norm type), its weight files (core.weightfiles: shards,
variants), the scheduler config, the sampling defaults of the pipeline class (read from its own
`__call__`, as `pipe(prompt)` would run), the files each stage's library will read, and notes on what the
loader chose or left out (a fallback, a variant, stored precision, a safety checker not carried).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import weightfiles
from core.errors import LoadError
from core.fileio import require_regular_file
from core.stages import PROMPTS_FILE, TEXT_ENCODERS, TOKENIZERS, components
from core.validate import get, is_int, is_number, read_json_object

SCHEDULER_FILE = "scheduler_config.json"
DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 2.0  # a folder whose pipeline class states none
# Pipelines whose sampling loop does more than call the denoiser (refused: another loop would be judged).
OWN_LOOPS = {
    "ValueGuidedRLPipeline": "plans by guiding its unet with value_function gradients and in-painting the"
    " observation at every step, which the optimized loop would not do; load its unet/ folder to optimize the"
    " trajectory denoiser alone (unconditional)",
}
# What transformers and diffusers read from a component folder besides weights: configs and vocabularies.
CONFIG_SUFFIXES = (".json", ".txt", ".model")
MAX_CONFIG_BYTES = 256 << 20  # the largest tokenizer.json on the hub is tens of MB; a sparse 200 GB file is not one


@dataclass(frozen=True)
class FolderModel:
    model_dir: Path
    model_class: str
    config: dict[str, Any]
    weights: weightfiles.WeightFiles
    scheduler: dict[str, Any] | None  # {"class", "config"}; None: the folder has none
    sampling: dict[str, Any] | None  # None: our defaults
    index: dict[str, Any] | None  # model_index.json of a pipeline folder
    stage_weights: dict[str, weightfiles.WeightFiles] = field(default_factory=dict)
    digested: tuple[Path, ...] = ()  # every file the loaders read, hashed into the source digest
    notes: tuple[str, ...] = ()


def read_third_party_json(path: Path) -> dict[str, Any]:
    """A diffusers/transformers config, read as its library reads it (Python's json: `Infinity` and `NaN`
    allowed; diffusers writes `"lambda_min_clipped": -Infinity` itself); its fields are checked one by one
    where they are used."""
    return read_json_object(path, LoadError, "JSON", constants=True)


def read(folder: Path, variant: str | None = None) -> FolderModel:
    if not (folder / "model_index.json").exists():
        if not (folder / "config.json").is_file():
            raise LoadError(f"{folder}: not a diffusers folder (no config.json or model_index.json)")
        return _model(folder, None, variant, (), None, None, {})
    index = read_third_party_json(folder / "model_index.json")
    if index.get("_class_name") in OWN_LOOPS:
        raise LoadError(f"{folder}: {index['_class_name']} {OWN_LOOPS[index['_class_name']]}")
    component = next((c for c in ("transformer", "unet") if index.get(c) not in (None, [None, None])), None)
    if component is None:
        raise LoadError(f"{folder}: model_index.json names no 'transformer' or 'unet' component")
    model_dir = folder / component
    if not (model_dir / "config.json").is_file():
        raise LoadError(f"{folder}: model_index.json names '{component}', but {component}/config.json is missing")
    scheduler = None
    if (folder / "scheduler" / SCHEDULER_FILE).exists():
        sched = read_third_party_json(folder / "scheduler" / SCHEDULER_FILE)
        name = get(sched, "_class_name", str, SCHEDULER_FILE, "DDPMScheduler", LoadError)
        scheduler = {"class": name, "config": sched}
    steps, guidance, true_cfg, notes = pipeline_defaults(index.get("_class_name"))
    sampling = {"num_inference_steps": steps, "guidance_scale": guidance}
    if true_cfg is not None:
        sampling["true_cfg_scale"] = true_cfg
    if scheduler is not None:
        sampling["scheduler"] = scheduler["class"]
    stage_weights, digested = {}, []
    for name, _ in components(index, (*TEXT_ENCODERS, "vae")):
        bases = weightfiles.DIFFUSERS if name == "vae" else weightfiles.TRANSFORMERS
        if (folder / name).is_dir():
            stage_weights[name] = weightfiles.resolve(folder / name, bases, variant)
            digested += [*config_files(folder / name), *stage_weights[name].files]
    for name, _ in components(index, TOKENIZERS):
        if (folder / name).is_dir():
            digested += config_files(folder / name)
    if (folder / PROMPTS_FILE).is_file():
        digested.append(folder / PROMPTS_FILE)
    notes += _left_out(index)
    return _model(model_dir, index, variant, tuple(notes), scheduler, sampling, stage_weights, digested)


def _model(
    model_dir: Path,
    index: dict[str, Any] | None,
    variant: str | None,
    notes: tuple[str, ...],
    scheduler: dict[str, Any] | None,
    sampling: dict[str, Any] | None,
    stage_weights: dict[str, weightfiles.WeightFiles],
    digested: list[Path] | tuple[Path, ...] = (),
) -> FolderModel:
    config = read_third_party_json(model_dir / "config.json")
    weights = weightfiles.resolve(model_dir, weightfiles.DIFFUSERS, variant)
    chosen = [f"{model_dir.name}: {weights.describe()}"] if weights.variant or len(weights.weights) > 1 else []
    return FolderModel(
        model_dir=model_dir,
        model_class=model_class(config),
        config=config,
        weights=weights,
        scheduler=scheduler,
        sampling=sampling,
        index=index,
        stage_weights=stage_weights,
        digested=(model_dir / "config.json", *weights.files, *digested),
        notes=(*notes, *chosen),
    )


def model_class(config: dict[str, Any]) -> str:
    """The config's class, remapped as diffusers remaps it: the hub's DiT-XL-2 and PixArt-alpha configs name
    `Transformer2DModel`, which diffusers loads as DiTTransformer2DModel or PixArtTransformer2DModel by the
    config's norm type (its own `_CLASS_REMAPPING_DICT`)."""
    from diffusers.models.model_loading_utils import _CLASS_REMAPPING_DICT

    name = str(config.get("_class_name"))
    remapped = _CLASS_REMAPPING_DICT.get(name, {}).get(str(config.get("norm_type")))
    return remapped or name


def pipeline_defaults(class_name: Any) -> tuple[int, float, float | None, list[str]]:
    """(steps, guidance_scale, true_cfg_scale or None, notes) as the pipeline class's own `__call__` defaults
    them: what `pipe(prompt)` runs. A guidance-embedded denoiser takes `guidance_scale` as its embedding's input
    and runs classifier-free guidance only at `true_cfg_scale` (Flux) or not at all (core.loading). A class
    diffusers does not have, or one without these defaults: ours, stated in a note."""
    params = _call_parameters(class_name)
    steps = params.get("num_inference_steps")
    if steps is None or not is_int(steps.default) or not 1 <= steps.default <= 10_000:
        note = f"pipeline class {class_name!r} states no default step count; sampling {DEFAULT_STEPS} steps"
        return DEFAULT_STEPS, DEFAULT_GUIDANCE, None, [note + f" at guidance {DEFAULT_GUIDANCE} (ours)"]
    guidance, true_cfg = (params.get(k) for k in ("guidance_scale", "true_cfg_scale"))
    scale = float(guidance.default) if guidance is not None and is_number(guidance.default) else 1.0
    cfg = float(true_cfg.default) if true_cfg is not None and is_number(true_cfg.default) else None
    return steps.default, scale, cfg, []


def _call_parameters(class_name: Any) -> dict[str, inspect.Parameter]:
    import diffusers

    if not isinstance(class_name, str) or not class_name.isidentifier() or class_name.startswith("_"):
        return {}
    try:
        cls = getattr(diffusers, class_name, None)
    except Exception:  # an optional dependency of that pipeline missing
        return {}
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        return {}
    return dict(inspect.signature(cls.__call__).parameters)


def _left_out(index: dict[str, Any]) -> list[str]:
    """Notes on the pipeline's components the artifact does not carry."""
    notes = []
    if index.get("safety_checker") not in (None, [None, None]):
        required = " (model_index.json: requires_safety_checker true)" if index.get("requires_safety_checker") else ""
        notes.append(
            f"the pipeline's safety_checker{required} is not part of the optimized artifact or its Triton export;"
            " run it on the outputs yourself where you need it"
        )
    return notes


def config_files(folder: Path) -> list[Path]:
    """A component folder's configs and vocabularies (what its library reads besides the weights), each a
    regular file (a FIFO would block, a device never end); sub-folders and other files are neither read nor
    hashed, and weight files are chosen by core.weightfiles."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix in CONFIG_SUFFIXES and ".index." not in entry.name:
            size = require_regular_file(entry, "component file", LoadError).st_size
            if size > MAX_CONFIG_BYTES:
                raise LoadError(f"{entry}: {size:,} bytes is too large for a config or vocabulary file")
            files.append(entry)
    return files
