"""LeRobot diffusion-policy folders, as `save_pretrained` writes them, read field by field (and written, for
the zoo's LeRobot-format reference):

    config.json                         "type": "diffusion", input/output features, UNet and scheduler fields
    model.safetensors                   the policy's state dict ("diffusion.unet.*"; before lerobot 0.4 also the
                                        normalization buffers, "normalize_inputs.buffer_<feature>.min", ...)
    policy_preprocessor.json (+ .safetensors)   lerobot >= 0.4: the normalizer step's stats, "<feature>.<stat>"
    policy_postprocessor.json (+ .safetensors)  the unnormalizer step's (the action's)
    train_config.json                   (optional) the training run's; its env.type names the environment

Normalization as LeRobot's NormalizerProcessorStep computes it (eps = 1e-8): MEAN_STD (x - mean) / (std + eps),
MIN_MAX 2 (x - min) / (max - min) - 1 (eps where max = min), IDENTITY; each is (x - center) / spread."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import LoadError
from core.validate import get, integer, number, read_json_object

CONFIG, WEIGHTS, TRAIN_CONFIG = "config.json", "model.safetensors", "train_config.json"
PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor.json", "policy_postprocessor.json"
UNET_PREFIX = "diffusion.unet."
OLD_BUFFERS = ("normalize_inputs.buffer_", "normalize_targets.buffer_", "unnormalize_outputs.buffer_")
EPS = 1e-8
STATE, ENV_STATE, ACTION = "observation.state", "observation.environment_state", "action"
SCHEDULERS = {"DDPM": "DDPMScheduler", "DDIM": "DDIMScheduler"}
MODES = ("MIN_MAX", "MEAN_STD", "IDENTITY")
UNET_FIELDS = ("down_dims", "kernel_size", "n_groups", "diffusion_step_embed_dim", "use_film_scale_modulation")


@dataclass(frozen=True)
class Policy:
    config: dict[str, Any]  # the LeRobotDiffusionUnet config (core.networks.lerobot_unet)
    scheduler: dict[str, Any]  # {"class", "config"} as core.loading reads a sidecar's
    sampling: dict[str, Any]
    files: tuple[Path, ...]  # every file read, for the source digest
    notes: tuple[str, ...]
    environment: str | None  # train_config.json's env.type (None: not given)


def is_policy(folder: Path) -> bool:
    """A folder whose config.json names a LeRobot policy type (diffusers configs carry `_class_name`)."""
    path = folder / CONFIG
    if not path.is_file() or (folder / "model_index.json").exists():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "type" in data and "_class_name" not in data


def read(folder: Path) -> Policy:
    where = str(folder / CONFIG)
    cfg = read_json_object(folder / CONFIG, LoadError, "JSON")
    kind = get(cfg, "type", str, where, error=LoadError)
    if kind != "diffusion":
        raise LoadError(f"{where}: LeRobot policy type '{kind}' is not supported (diffusion policies are)")
    inputs = get(cfg, "input_features", dict, where, error=LoadError)
    outputs = get(cfg, "output_features", dict, where, error=LoadError)
    images = [k for k, v in inputs.items() if isinstance(v, dict) and v.get("type") == "VISUAL"]
    if images:
        raise LoadError(
            f"{where}: image observations ({', '.join(images)}) are not supported yet; state and environment-state "
            "policies are"
        )
    observations = [(name, _dim(inputs, name, where)) for name in (STATE, ENV_STATE) if name in inputs]
    if not observations or observations[0][0] != STATE:
        raise LoadError(f"{where}: input_features must include '{STATE}' (LeRobot's diffusion policy requires it)")
    unknown = sorted(set(inputs) - {STATE, ENV_STATE})
    if unknown:
        raise LoadError(f"{where}: input feature(s) {unknown} are not supported ({STATE}, {ENV_STATE} are)")
    if set(outputs) != {ACTION}:
        raise LoadError(f"{where}: output_features must be exactly '{ACTION}', got {sorted(outputs)}")
    action_dim = _dim(outputs, ACTION, where)
    horizon = integer(cfg.get("horizon"), f"{where}: horizon", 1, 4096, LoadError)
    n_obs = integer(cfg.get("n_obs_steps"), f"{where}: n_obs_steps", 1, 64, LoadError)
    n_act = integer(cfg.get("n_action_steps"), f"{where}: n_action_steps", 1, 4096, LoadError)
    if n_act > horizon - n_obs + 1:
        raise LoadError(f"{where}: n_action_steps {n_act} exceeds horizon - n_obs_steps + 1 = {horizon - n_obs + 1}")
    down = get(cfg, "down_dims", list, where, error=LoadError)
    if not down or horizon % 2 ** len(down):  # LeRobot's DiffusionConfig check
        raise LoadError(f"{where}: horizon {horizon} must divide by 2^len(down_dims) = {2 ** len(down)}")
    stats, files, notes = _stats(folder, where)
    modes = get(cfg, "normalization_mapping", dict, where, error=LoadError)
    kinds = {STATE: "STATE", ENV_STATE: "ENV", ACTION: "ACTION"}
    normalization = {}
    for name, dim in [*observations, (ACTION, action_dim)]:
        mode = modes.get(kinds[name], "IDENTITY")
        if mode not in MODES:
            raise LoadError(f"{where}: normalization_mapping.{kinds[name]} '{mode}' is not one of {', '.join(MODES)}")
        if mode != "IDENTITY":
            normalization[name] = center_spread(stats, name, mode, dim, where)
    config = {
        "horizon": horizon,
        "action_dim": action_dim,
        "observations": [list(o) for o in observations],
        "n_obs_steps": n_obs,
        "n_action_steps": n_act,
        **{f: cfg.get(f) for f in UNET_FIELDS},
        "normalization": normalization,
    }
    scheduler_type = get(cfg, "noise_scheduler_type", str, where, error=LoadError)
    if scheduler_type not in SCHEDULERS:
        raise LoadError(f"{where}: noise_scheduler_type '{scheduler_type}' is not DDPM or DDIM")
    prediction = get(cfg, "prediction_type", str, where, error=LoadError)
    if prediction not in ("epsilon", "sample"):
        raise LoadError(f"{where}: prediction_type '{prediction}' is not epsilon or sample (LeRobot's two)")
    train_steps = integer(cfg.get("num_train_timesteps"), f"{where}: num_train_timesteps", 1, 100_000, LoadError)
    scheduler_config = {
        "num_train_timesteps": train_steps,
        "beta_start": number(cfg.get("beta_start"), f"{where}: beta_start", 0, 1, LoadError),
        "beta_end": number(cfg.get("beta_end"), f"{where}: beta_end", 0, 1, LoadError),
        "beta_schedule": get(cfg, "beta_schedule", str, where, error=LoadError),
        "clip_sample": get(cfg, "clip_sample", bool, where, error=LoadError),
        "clip_sample_range": number(cfg.get("clip_sample_range"), f"{where}: clip_sample_range", 0, None, LoadError),
        "prediction_type": prediction,
    }
    steps = cfg.get("num_inference_steps")
    steps = train_steps if steps is None else integer(steps, f"{where}: num_inference_steps", 1, train_steps, LoadError)
    scheduler = {"class": SCHEDULERS[scheduler_type], "config": scheduler_config}
    sampling = {"scheduler": scheduler["class"], "num_inference_steps": steps, "guidance_scale": 1.0}
    files = [folder / CONFIG, folder / WEIGHTS, *files]
    environment = None
    if (folder / TRAIN_CONFIG).is_file():
        train = read_json_object(folder / TRAIN_CONFIG, LoadError, "JSON")
        env = train.get("env")
        if isinstance(env, dict) and isinstance(env.get("type"), str):
            environment = env["type"]
        files.append(folder / TRAIN_CONFIG)
    return Policy(config, scheduler, sampling, tuple(files), notes, environment)


def unet_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser's weights of a policy state dict: "diffusion.unet." stripped; normalization buffers (the
    old layout) left out, as they are read as stats. Anything else is refused (a vision encoder's weights)."""
    unet = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    other = [k for k in state if not k.startswith((UNET_PREFIX, *OLD_BUFFERS))]
    if other:
        raise LoadError(f"{WEIGHTS}: weights outside the denoiser are not supported, e.g. '{other[0]}'")
    return unet


def _dim(features: dict[str, Any], name: str, where: str) -> int:
    feature = get(features, name, dict, where, error=LoadError)
    shape = get(feature, "shape", list, f"{where}: {name}", error=LoadError)
    if len(shape) != 1:
        raise LoadError(f"{where}: {name}.shape must be one dimension, got {shape}")
    return integer(shape[0], f"{where}: {name}.shape", 1, 65536, LoadError)


def _stats(folder: Path, where: str) -> tuple[dict[str, dict[str, torch.Tensor]], list[Path], tuple[str, ...]]:
    """feature -> stat -> tensor, from the processor files (lerobot >= 0.4) or the weights' buffers (older)."""
    from safetensors.torch import load_file

    stats: dict[str, dict[str, torch.Tensor]] = {}
    files: list[Path] = []
    for name, registry in ((PREPROCESSOR, "normalizer_processor"), (POSTPROCESSOR, "unnormalizer_processor")):
        if not (folder / name).is_file():
            continue
        pipeline = read_json_object(folder / name, LoadError, "JSON")
        files.append(folder / name)
        for step in get(pipeline, "steps", list, str(folder / name), error=LoadError):
            if isinstance(step, dict) and step.get("registry_name") == registry and "state_file" in step:
                state_file = folder / Path(get(step, "state_file", str, name, error=LoadError)).name
                if not state_file.is_file():
                    raise LoadError(f"{folder / name}: its normalizer stats file {state_file.name} is missing")
                files.append(state_file)
                for key, value in load_file(str(state_file)).items():
                    feature, stat = key.rsplit(".", 1)
                    stats.setdefault(feature, {})[stat] = value.float()
    if files:
        return stats, files, ()
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS), "pt") as weights:  # the buffers only: the UNet is read when it is built
        for key in weights.keys():  # noqa: SIM118 (a safetensors handle is not a mapping)
            prefix = next((p for p in OLD_BUFFERS if key.startswith(p)), None)
            if prefix is not None:
                feature, stat = key[len(prefix) :].rsplit(".", 1)
                name = {STATE.replace(".", "_"): STATE, ENV_STATE.replace(".", "_"): ENV_STATE}.get(feature, feature)
                stats.setdefault(name, {})[stat] = weights.get_tensor(key).float()
    return stats, files, ("normalization stats read from model.safetensors (the layout before lerobot 0.4)",)


def center_spread(stats: dict[str, dict[str, torch.Tensor]], name: str, mode: str, dim: int, where: str) -> list:
    """Feature `name`'s LeRobot normalization (`mode`) from its stats as [center, spread] (core.ir.Normalization)."""
    need = ("min", "max") if mode == "MIN_MAX" else ("mean", "std")
    found = stats.get(name, {})
    missing = [s for s in need if s not in found]
    if missing:
        raise LoadError(f"{where}: {name} is normalized {mode} but its stats lack {', '.join(missing)}")
    a, b = (found[s].flatten().double() for s in need)
    if a.numel() != dim or b.numel() != dim or not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        raise LoadError(f"{where}: {name} stats must be {dim} finite values each")
    if mode == "MIN_MAX":
        denom = torch.where(b - a == 0, torch.full_like(a, EPS), b - a)
        center, spread = a + denom / 2, denom / 2
    else:
        center, spread = a, b + EPS
    if bool((spread <= 0).any()):
        raise LoadError(f"{where}: {name} stats give a non-positive spread (max < min, or std < 0)")
    return [center.tolist(), spread.tolist()]


def write(
    folder: Path,
    model: torch.nn.Module,
    stats: dict[str, dict[str, torch.Tensor]],
    scheduler: dict[str, Any],
    train: dict[str, Any] | None = None,
) -> None:
    """A LeRobot >= 0.4 folder for `model` (a LeRobotDiffusionUnet) with MIN_MAX stats `stats` (feature ->
    {"min", "max"}), `scheduler` (LeRobot's scheduler fields) and `train` (train_config.json, if given)."""
    from safetensors.torch import save_file

    c = model.config
    features = {
        name: {"type": t, "shape": [dim]} for (name, dim), t in zip(c.observations, ("STATE", "ENV"), strict=False)
    }
    config = {
        "type": "diffusion",
        "n_obs_steps": c.n_obs_steps,
        "normalization_mapping": {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"},
        "input_features": features,
        "output_features": {ACTION: {"type": "ACTION", "shape": [c.action_dim]}},
        "device": "cpu",
        "use_amp": False,
        "horizon": c.horizon,
        "n_action_steps": c.n_action_steps,
        "drop_n_last_frames": c.horizon - c.n_action_steps - c.n_obs_steps + 1,
        **{f: getattr(c, f) for f in UNET_FIELDS},
        **scheduler,
        "do_mask_loss_for_padding": False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({UNET_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    every = {**features, ACTION: config["output_features"][ACTION]}
    norm = {"eps": EPS, "features": every, "norm_map": config["normalization_mapping"]}
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    pre = [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        device,
        {"registry_name": "normalizer_processor", "config": norm},
    ]
    post = [{"registry_name": "unnormalizer_processor", "config": norm}, device]
    for name, steps, chosen in ((PREPROCESSOR, pre, stats), (POSTPROCESSOR, post, {ACTION: stats[ACTION]})):
        index, step = next((i, s) for i, s in enumerate(steps) if "normalizer" in s["registry_name"])
        state = f"{name.removesuffix('.json')}_step_{index}_{step['registry_name']}.safetensors"
        flat = {f"{f}.{s}": v.float().contiguous() for f, d in chosen.items() for s, v in d.items()}
        save_file(flat, str(folder / state))
        steps[index] = {**step, "state_file": state}
        (folder / name).write_text(json.dumps({"name": name.removesuffix(".json"), "steps": steps}, indent=2) + "\n")
    if train is not None:
        (folder / TRAIN_CONFIG).write_text(json.dumps(train, indent=2) + "\n")
