"""`python -m zoo train {dit,unet,classifier}`: reproduce the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from zoo import SHIPPED


@click.group()
def main() -> None:
    """Train the in-tree reference models."""


@main.command()
@click.argument("which", type=click.Choice(["dit", "unet", "classifier"]))
@click.option("--steps", default=6000, show_default=True, help="Optimizer steps (denoisers).")
@click.option("--epochs", default=60, show_default=True, help="Epochs (classifier).")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Weights file (default: shipped path).")
def train(which: str, steps: int, epochs: int, seed: int, threads: int, out: Path | None) -> None:
    """Train WHICH and write `<out>` (safetensors) plus its JSON sidecar."""
    from zoo.train import train_classifier, train_denoiser

    if threads:
        torch.set_num_threads(threads)
    out = out or SHIPPED[which]
    if which == "classifier":
        meta = train_classifier(out, epochs=epochs, seed=seed)
    else:
        meta = train_denoiser(which, out, steps=steps, seed=seed)
    click.echo(json.dumps(meta["training"], indent=2))


if __name__ == "__main__":
    main()
