"""The digits VAE: a small diffusers AutoencoderKL, 1x16x16 images <-> 4x8x8 latents."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zoo.data import load_digits16, split
from zoo.folders import ema_update, optimizer_step, warmup_cosine, write_folder, write_json
from zoo.models import VAE_CONFIG, build_vae

DATA = "sklearn load_digits, bilinear 8x8 -> 16x16, [-1, 1]"
HOLDOUT: dict[str, Any] = {"holdout": 0.2, "seed": 0}  # the digits classifier's split: its held-out digits are ours


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp_min(1e-10))


@torch.no_grad()
def encode_mean(vae: Any, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Unscaled latent means of images, in chunks."""
    return torch.cat([vae.encode(x).latent_dist.mean for x in images.split(chunk)])


@torch.no_grad()
def evaluate_vae(vae: Any) -> dict[str, float]:
    """Reconstruction PSNR and digits-classifier accuracy (reconstructed vs real) on the held-out digits."""
    from zoo import load_classifier

    images, labels = load_digits16()
    _, held_out = split(len(images), **HOLDOUT)
    x, y = images[held_out], labels[held_out]
    recon = vae.decode(encode_mean(vae, x)).sample.clamp(-1, 1)
    classifier = load_classifier()
    return {
        "heldout_images": len(held_out),
        "psnr_db_mean": float(psnr(recon, x).mean()),
        "psnr_db_min": float(psnr(recon, x).min()),
        "classifier_accuracy_real": float((classifier(x).argmax(1) == y).float().mean()),
        "classifier_accuracy_reconstructed": float((classifier(recon).argmax(1) == y).float().mean()),
    }


def train_vae(
    out: Path,
    steps: int = 3000,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    ema_decay: float = 0.998,
) -> dict[str, Any]:
    """Train on the non-held-out digits (MSE + kl_weight * KL per latent element) and write a diffusers folder.

    The saved `scaling_factor` is 1 / std of the latent means over the whole data set, as in SD.
    """
    torch.manual_seed(seed)
    images, _ = load_digits16()
    train_idx, _ = split(len(images), **HOLDOUT)
    vae = build_vae().train()
    ema = copy.deepcopy(vae).eval().requires_grad_(False)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, steps, max(1, min(100, steps // 10))))
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in tqdm(range(steps), desc="train vae-digits", unit="step"):
        x = images[train_idx[torch.randint(0, len(train_idx), (batch_size,), generator=gen)]]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        optimizer_step(loss, opt, sched, vae.parameters())
        ema_update(ema, vae, ema_decay, step)
        losses.append(mse.item())
    seconds, threads = time.time() - start, torch.get_num_threads()
    latents = encode_mean(ema, images)
    ema.register_to_config(scaling_factor=float(1 / latents.std()))
    tail = losses[-100:]
    record = {
        "model": {"class": "AutoencoderKL", "config": VAE_CONFIG},
        "training": {
            "data": f"{DATA}; trained on all but the held-out digits ({HOLDOUT})",
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "kl_weight_per_latent_element": kl_weight,
            "ema_decay": ema_decay,
            "final_loss": sum(tail) / len(tail),
            "loss": "reconstruction MSE (mean of the last 100 steps; KL term excluded)",
            "seconds": round(seconds, 1),
            "threads": threads,
            "command": f"python -m zoo train vae-digits --steps {steps} --seed {seed} --threads {threads}",
        },
        "latents": {
            "mean": float(latents.mean()),
            "std": float(latents.std()),
            "scaling_factor": 1 / latents.std().item(),
        },
        "evaluation": evaluate_vae(ema),
    }

    def write(tmp: Path) -> None:
        ema.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "training.json", record)

    write_folder(out, write)
    return record
