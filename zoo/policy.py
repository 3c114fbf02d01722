"""The in-tree PushT policies: demonstrations from the scripted expert (zoo.pusht_expert), then a diffusion
policy trained on them the way LeRobot trains one (its windows, normalization, DDPM loss and optimizer preset):
LeRobot's 1-D UNet, written as LeRobot's `save_pretrained` lays it out, or the transformer action denoiser
(core.networks.action_transformer), written as our checkpoint; each evaluated in closed loop
(core.environments)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.environments import pusht

DEMO_SEED = 1000  # demonstration episodes use seeds DEMO_SEED + i; evaluation seeds start far from them
EVAL_SEED = 200_000
# LeRobot's diffusion defaults but a smaller UNet (down_dims 512/1024/2048 -> 64/128/256: 4.5 M parameters).
POLICY: dict[str, Any] = {
    "horizon": 16,
    "n_obs_steps": 2,
    "n_action_steps": 8,
    "down_dims": [64, 128, 256],
    "kernel_size": 5,
    "n_groups": 8,
    "diffusion_step_embed_dim": 128,
    "use_film_scale_modulation": True,
}
SCHEDULER = {
    "noise_scheduler_type": "DDPM",
    "num_train_timesteps": 100,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "num_inference_steps": None,
}
# The transformer action denoiser (core.networks.action_transformer): 6 adaLN-Zero blocks of width 128, MLPs
# twice as wide (1.3 M parameters).
TRANSFORMER: dict[str, Any] = {
    "horizon": 16,
    "n_obs_steps": 2,
    "n_action_steps": 8,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "mlp_ratio": 2,
    "diffusion_step_embed_dim": 128,
}
# Optimizers: LeRobot's diffusion preset for the UNet; DiT's AdamW at a higher rate for the transformer, whose
# zero-initialized modulation learns slowly at 1e-4 (Chi et al. train theirs with weight decay 1e-3).
OPTIMIZER = {
    "unet": {"lr": 1e-4, "betas": (0.95, 0.999), "eps": 1e-8, "weight_decay": 1e-6},
    "transformer": {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-3},
}
# Weight averaging: Chi et al. evaluate an EMA of the weights (warm-up power 0.75, decay up to 0.9999), through
# diffusers' EMAModel. The UNet reference was trained without it (its record says so), the transformer with it.
EMA: dict[str, dict[str, Any] | None] = {
    "unet": None,
    "transformer": {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75},
}
FEATURES = (pusht.STATE, pusht.ENV_STATE)


def record_demonstrations(episodes: int, seed: int = DEMO_SEED, log: Any = print) -> dict[str, Any]:
    """`episodes` expert episodes (seeds seed..seed+episodes-1); the successful ones kept, frame by frame as
    a LeRobot dataset holds them: the observation before the step and the action taken."""
    from zoo.pusht_expert import Expert

    frames: dict[str, list[np.ndarray]] = {pusht.STATE: [], pusht.ENV_STATE: [], "action": [], "episode_index": []}
    kept, lengths, start = 0, [], time.time()
    for i in range(episodes):
        env = pusht.make_env()
        obs = pusht.observation(env.reset(seed=seed + i)[0])
        expert = Expert(seed + i)
        episode: dict[str, list[Any]] = {k: [] for k in frames}
        success = False
        for _ in range(pusht.MAX_STEPS):
            action = np.clip(expert.act(env), *pusht.ACTION_RANGE)
            episode[pusht.STATE].append(obs[pusht.STATE])
            episode[pusht.ENV_STATE].append(obs[pusht.ENV_STATE])
            episode["action"].append(action.astype(np.float32))
            episode["episode_index"].append(np.int64(kept))
            raw, _, terminated, _, info = env.step(action)
            obs = pusht.observation(raw)
            if info["is_success"] or terminated:
                success = True
                break
        env.close()
        if success:
            for k in frames:
                frames[k] += episode[k]
            kept += 1
            lengths.append(len(episode["action"]))
        if (i + 1) % 10 == 0 or i + 1 == episodes:
            log(f"demonstrations: {i + 1}/{episodes} episodes, {kept} successful ({time.time() - start:.0f} s)")
    data = {k: np.stack(v) for k, v in frames.items()}
    record = {"episodes": episodes, "successful": kept, "seeds": [seed, seed + episodes - 1]}
    record["mean_length"] = float(np.mean(lengths)) if lengths else 0.0
    return {"frames": data, "record": record}


def windows(frames: dict[str, np.ndarray], horizon: int, n_obs: int, drop_last: int) -> dict[str, torch.Tensor]:
    """LeRobot's training windows: for every frame t (but an episode's last `drop_last`), observations at
    t - n_obs + 1..t and actions at t - n_obs + 1..t - n_obs + horizon, indices clamped inside the episode
    (LeRobot pads with the edge frames)."""
    episode = frames["episode_index"]
    starts = {e: int(np.argmax(episode == e)) for e in np.unique(episode)}
    ends = {e: int(len(episode) - np.argmax(episode[::-1] == e) - 1) for e in np.unique(episode)}
    rows: dict[str, list[np.ndarray]] = {k: [] for k in (*FEATURES, "action")}
    for t in range(len(episode)):
        e = episode[t]
        if t > ends[e] - drop_last:
            continue
        obs_idx = np.clip(np.arange(t - n_obs + 1, t + 1), starts[e], ends[e])
        act_idx = np.clip(np.arange(t - n_obs + 1, t - n_obs + 1 + horizon), starts[e], ends[e])
        for k in FEATURES:
            rows[k].append(frames[k][obs_idx])
        rows["action"].append(frames["action"][act_idx])
    return {k: torch.from_numpy(np.stack(v)).float() for k, v in rows.items()}


def min_max_stats(frames: dict[str, np.ndarray]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        k: {"min": torch.from_numpy(frames[k].min(0)).float(), "max": torch.from_numpy(frames[k].max(0)).float()}
        for k in (*FEATURES, "action")
    }


def train_policy(
    frames: dict[str, np.ndarray],
    out: Path,
    steps: int,
    seed: int = 0,
    batch: int = 64,
    log: Any = print,
    network: str = "unet",
) -> dict[str, Any]:
    """Train a policy (LeRobot's recipe: DDPM epsilon loss, AdamW, cosine schedule with 500 warm-up steps; the
    optimizer of `network` in OPTIMIZER, its weight average in EMA) and write it to `out`: the UNet as a LeRobot
    folder, the transformer as our checkpoint (weights + sidecar)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from core import lerobot_folder
    from core.ir import Normalization

    torch.manual_seed(seed)
    stats = min_max_stats(frames)
    observations = [[k, int(frames[k].shape[1])] for k in FEATURES]
    config = POLICY if network == "unet" else TRANSFORMER
    model = _network(network, observations, stats)
    drop = config["horizon"] - config["n_action_steps"] - config["n_obs_steps"] + 1
    data = windows(frames, config["horizon"], config["n_obs_steps"], drop)

    def normalized(name: str, x: torch.Tensor) -> torch.Tensor:  # as the loaded policy normalizes (LeRobot's)
        center, spread = lerobot_folder.center_spread(stats, name, "MIN_MAX", x.shape[-1], "training stats")
        return Normalization(tuple(center), tuple(spread)).normalize(x)

    data = {k: normalized(k, v) for k, v in data.items()}
    noise = DDPMScheduler(
        **{k: v for k, v in SCHEDULER.items() if k not in ("noise_scheduler_type", "num_inference_steps")}
    )
    opt = torch.optim.AdamW(model.parameters(), **OPTIMIZER[network])
    lr = get_scheduler("cosine", opt, num_warmup_steps=500, num_training_steps=steps)
    averaging = EMA[network]
    ema = None if averaging is None else EMAModel(model.parameters(), **averaging)
    generator = torch.Generator().manual_seed(seed)
    n = data["action"].shape[0]
    model.train()
    start, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=generator)
        actions = data["action"][idx]
        cond = torch.cat([data[k][idx] for k in FEATURES], dim=-1).flatten(1)
        eps = torch.randn(actions.shape, generator=generator)
        t = torch.randint(0, noise.config.num_train_timesteps, (batch,), generator=generator)
        pred = model(noise.add_noise(actions, eps, t), t.float(), cond)
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        if (step + 1) % 500 == 0 or step + 1 == steps:
            log(f"train: step {step + 1}/{steps} loss {np.mean(losses[-500:]):.4f} ({time.time() - start:.0f} s)")
    if ema is not None:
        ema.copy_to(model.parameters())
    model.eval()
    train = {"env": {"type": "pusht", "obs_type": "environment_state_agent_pos"}, "seed": seed, "steps": steps}
    train["batch_size"] = batch
    if network == "unet":
        lerobot_folder.write(out, model, stats, SCHEDULER, train)
    else:
        _write_checkpoint(out, model)
    return {
        "network": network,
        "config": config,
        "optimizer": OPTIMIZER[network],
        "ema": EMA[network],
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "windows": n,
        "final_loss": float(np.mean(losses[-500:])),
        "seconds": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _network(network: str, observations: list[list[Any]], stats: dict[str, dict[str, torch.Tensor]]) -> Any:
    if network == "unet":
        from core.networks.lerobot_unet import LeRobotDiffusionUnet

        unet = {k: v for k, v in POLICY.items() if k != "down_dims"}
        return LeRobotDiffusionUnet(
            action_dim=2, observations=observations, **unet, down_dims=tuple(POLICY["down_dims"])
        )
    from core import lerobot_folder
    from core.networks.action_transformer import ActionTransformer

    normalization = {}  # as a LeRobot folder's MIN_MAX stats load (core.lerobot_folder.center_spread)
    for name, dims in [*observations, ["action", 2]]:
        normalization[name] = lerobot_folder.center_spread(stats, name, "MIN_MAX", dims, "training stats")
    return ActionTransformer(action_dim=2, observations=observations, normalization=normalization, **TRANSFORMER)


def _write_checkpoint(weights: Path, model: Any) -> None:
    """The transformer policy as our checkpoint: its config (normalization and chunking inside), LeRobot's
    DDPM scheduler fields as a diffusers scheduler, and the environment it acts in."""
    from core.checkpoint import save_checkpoint

    scheduler = {k: v for k, v in SCHEDULER.items() if k not in ("noise_scheduler_type", "num_inference_steps")}
    steps = SCHEDULER["num_train_timesteps"]
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    meta = {
        "model": {"class": type(model).__name__, "config": config},
        "scheduler": {"class": "DDPMScheduler", "config": scheduler},
        "sampling": {"scheduler": "DDPMScheduler", "num_inference_steps": steps, "guidance_scale": 1.0},
        "environment": "pusht",
    }
    save_checkpoint(weights, model.state_dict(), meta)


def evaluate_policy(
    folder: Path, episodes: int, seed: int = EVAL_SEED, scheduler: str | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Closed-loop success of the policy folder in torch (`scheduler`, `steps`: another sampler or step count
    than its config's, e.g. ddim and 10)."""
    import dataclasses

    from core.environments import programs, rollout
    from core.loading import load_program
    from core.schedulers import with_scheduler

    program = load_program(folder)
    plan = program.plan if scheduler is None else with_scheduler(program.plan, scheduler)
    program = program.replace(plan=dataclasses.replace(plan, num_inference_steps=steps or plan.num_inference_steps))
    assert program.spec.chunking is not None
    start = time.time()
    done = rollout.run(
        "pusht",
        programs.torch_policy(program, seed),
        list(range(seed, seed + episodes)),
        program.spec.chunking,
        desc=f"evaluate: {episodes} episodes",
    )
    successes = int(done.success.sum())
    return {
        "episodes": episodes,
        "seeds": [seed, seed + episodes - 1],
        "scheduler": program.plan.scheduler_class,
        "sampling_steps": program.plan.num_inference_steps,
        "success": successes,
        "success_rate": successes / episodes,
        "beta_interval_95": list(done.interval()),
        "mean_max_coverage": float(done.max_coverage.mean()),
        "seconds": round(time.time() - start, 1),
    }


def save_demonstrations(path: Path, demos: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in demos["frames"].items()},
        str(path),
        {"record": json.dumps(demos["record"])},
    )


def load_demonstrations(path: Path) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        record = json.loads((f.metadata() or {}).get("record", "{}"))
    return {"frames": load_file(str(path)), "record": record}
