"""Tiny random-weight LeRobot diffusion-policy folders for PushT's state observations, laid out as LeRobot's
`save_pretrained` writes them (lerobot >= 0.4: processor files beside the weights; `old=True`: the layout
before 0.4, the normalization stats as buffers inside model.safetensors). Random weights: loading and
mechanics, never fidelity."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core import lerobot_folder
from core.environments import pusht
from core.networks.lerobot_unet import LeRobotDiffusionUnet
from zoo.policy import SCHEDULER

STATS = {
    pusht.STATE: {"min": torch.tensor([13.0, 20.0]), "max": torch.tensor([496.0, 500.0])},
    pusht.ENV_STATE: {"min": torch.full((16,), 0.0), "max": torch.full((16,), 512.0)},
    "action": {"min": torch.tensor([12.0, 25.0]), "max": torch.tensor([511.0, 505.0])},
}
# The zoo policy's scheduler (LeRobot's defaults) as DDIM at 4 steps: closed-loop episodes stay quick.
QUICK = {**SCHEDULER, "noise_scheduler_type": "DDIM", "num_inference_steps": 4}


def tiny_policy(horizon: int = 8, n_action_steps: int = 4) -> LeRobotDiffusionUnet:
    torch.manual_seed(0)
    return LeRobotDiffusionUnet(
        horizon=horizon,
        action_dim=2,
        observations=((pusht.STATE, 2), (pusht.ENV_STATE, 16)),
        n_obs_steps=2,
        n_action_steps=n_action_steps,
        down_dims=(8, 16),
        kernel_size=3,
        n_groups=4,
        diffusion_step_embed_dim=8,
    ).eval()


def save(folder: Path, old: bool = False, env: str | None = "pusht", scheduler: dict | None = None) -> Path:
    model = tiny_policy()
    train = None if env is None else {"env": {"type": env}}
    lerobot_folder.write(folder, model, STATS, scheduler or QUICK, train)
    if old:  # lerobot < 0.4: no processor files, the stats as normalization buffers in the weights
        from safetensors.torch import load_file, save_file

        for name in folder.glob("policy_*"):
            name.unlink()
        state = load_file(str(folder / lerobot_folder.WEIGHTS))
        for feature, stats in STATS.items():
            modules = ("normalize_targets", "unnormalize_outputs") if feature == "action" else ("normalize_inputs",)
            for module in modules:
                for stat, value in stats.items():
                    state[f"{module}.buffer_{feature.replace('.', '_')}.{stat}"] = value.clone()
        save_file(state, str(folder / lerobot_folder.WEIGHTS))
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / lerobot_folder.CONFIG
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
