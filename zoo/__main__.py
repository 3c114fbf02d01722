"""`python -m zoo train {dit,unet,classifier,vae-digits,sd-digits,pixart-digits}`: reproduce the shipped weights.

`python -m zoo evaluate {sd-digits,pixart-digits}`: prompt adherence of a text-to-image pipeline folder.

`python -m zoo policy --network {unet,transformer}`: PushT expert demonstrations, a diffusion policy trained on
them, its closed-loop success.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from zoo import PIPELINES, POLICIES, SHIPPED, VAE

DEFAULT_STEPS = {"dit": 6000, "unet": 6000, "vae-digits": 2000, "sd-digits": 5000, "pixart-digits": 6000}


@click.group()
def main() -> None:
    """Train the in-tree reference models."""


@main.command()
@click.argument("which", type=click.Choice([*SHIPPED, "vae-digits", *PIPELINES]))
@click.option("--steps", type=int, default=None, help=f"Optimizer steps (default: {DEFAULT_STEPS}).")
@click.option("--epochs", default=60, show_default=True, help="Epochs (classifier).")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Weights file or folder (default: shipped).")
@click.option("--vae", type=click.Path(path_type=Path), default=VAE, show_default=True, help="VAE folder (pipelines).")
@click.option("--evaluate-seeds", default=5, show_default=True, help="Seeds per prompt for a pipeline's evaluation.")
def train(which: str, steps: int | None, epochs: int, seed: int, threads: int, out: Path | None, **kw: Any) -> None:
    """Train WHICH and write it: `<out>` (safetensors) plus its JSON sidecar, or a diffusers folder."""
    if threads:
        torch.set_num_threads(threads)
    steps = steps or DEFAULT_STEPS.get(which, 0)
    if which == "vae-digits":
        from zoo.vae import train_vae

        record = train_vae(out or VAE, steps=steps, seed=seed)
        summary = {**record["training"], **record["evaluation"]}
    elif which in PIPELINES:
        from zoo.text2img import train_pipeline

        record = train_pipeline(
            which, out or PIPELINES[which], kw["vae"], steps, seed, evaluate_seeds=kw["evaluate_seeds"]
        )
        summary = {k: record[k] for k in ("training", "evaluation") if k in record}
    elif which == "classifier":
        from zoo.train import train_classifier

        summary = train_classifier(out or SHIPPED[which], epochs=epochs, seed=seed)["training"]
    else:
        from zoo.train import train_denoiser

        summary = train_denoiser(which, out or SHIPPED[which], steps=steps, seed=seed)["training"]
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.argument("which", type=click.Choice(list(PIPELINES)))
@click.option("--folder", type=click.Path(path_type=Path), default=None, help="Pipeline folder (default: shipped).")
@click.option("--seeds", default=5, show_default=True, help="Seeds 0..N-1 for every prompt of prompts.txt.")
@click.option("--steps", default=20, show_default=True)
@click.option("--guidance", "guidances", type=float, multiple=True, default=(1.0, 4.0), show_default=True)
def evaluate(which: str, folder: Path | None, seeds: int, steps: int, guidances: tuple[float, ...]) -> None:
    """Prompted-digit agreement and attribute adherence of WHICH's pipeline."""
    from zoo.pipelines import evaluate_pipeline, load_pipeline

    pipe = load_pipeline(folder or PIPELINES[which])
    click.echo(json.dumps(evaluate_pipeline(pipe, seeds=seeds, steps=steps, guidances=guidances), indent=2))


@main.command()
@click.option("--network", type=click.Choice(["unet", "transformer"]), default="unet", show_default=True)
@click.option("--episodes", default=100, show_default=True, help="Expert episodes (the successful ones are kept).")
@click.option("--steps", default=20000, show_default=True, help="Training steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--evaluate", "eval_episodes", default=100, show_default=True, help="Closed-loop evaluation episodes.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Where to write (default: the zoo's).")
@click.option("--demos", type=click.Path(path_type=Path), default=None, help="Reuse (or write) demonstrations here.")
def policy(
    network: str, episodes: int, steps: int, seed: int, eval_episodes: int, out: Path | None, demos: Path | None
) -> None:
    """Record expert PushT demonstrations, train a policy on them (the LeRobot-format UNet or the transformer),
    evaluate it closed loop."""
    from zoo.policy import (
        evaluate_policy,
        load_demonstrations,
        record_demonstrations,
        save_demonstrations,
        train_policy,
    )

    out = out or POLICIES[network]
    if demos is not None and demos.exists():
        data = load_demonstrations(demos)
    else:
        data = record_demonstrations(episodes, log=lambda m: click.echo(m, err=True))
        if demos is not None:
            save_demonstrations(demos, data)
    command = f"python -m zoo policy --network {network} --episodes {episodes} --steps {steps} --seed {seed}"
    record = {"command": f"{command} --evaluate {eval_episodes}", "demonstrations": data["record"]}
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    record["training"] = train_policy(data["frames"], out, steps, seed, log=log, network=network)
    if eval_episodes:
        record["evaluation"] = evaluate_policy(out, eval_episodes)
    record_path = out / "zoo-record.json" if out.is_dir() else out.with_suffix(".record.json")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
