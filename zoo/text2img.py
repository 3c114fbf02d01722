"""Text-to-image latent diffusion on the digits: SD-style (UNet) and PixArt-style (transformer) pipelines.

Each denoiser is trained jointly with its own tiny CLIP text encoder on the frozen digits VAE's latents
(`latent_dist.mean * scaling_factor`, precomputed once), epsilon prediction, and saved with its
tokenizer, text encoder, VAE and sampling scheduler as a diffusers pipeline folder.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zoo.attributes import (
    ATTRIBUTES,
    bins,
    evaluation_prompts,
    measure,
    prompt_index,
    tercile_edges,
    training_prompts,
)
from zoo.data import load_digits16
from zoo.folders import ema_update, optimizer_step, warmup_cosine, write_folder, write_json
from zoo.models import PIXART_CONFIG, SD_UNET_CONFIG, TEXT_ENCODER_CONFIG, build_pixart, build_sd_unet
from zoo.pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, evaluate_pipeline
from zoo.tokenizer import build_tokenizer, tokenize
from zoo.vae import DATA, encode_mean

TRAIN_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
# DDIM with SD's "leading" spacing: with the cosine schedule's near-zero terminal SNR, "trailing" (t=999)
# divides by sqrt(alpha_bar) ~ 1e-3 on the first step; clip_sample off since latents are not in [-1, 1].
SAMPLING_SCHEDULER = {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
BATCH_SIZE = {"sd-digits": 32, "pixart-digits": 64}  # the UNet costs ~3x the transformer per sample
KINDS = {
    "sd-digits": ("StableDiffusionPipeline", "UNet2DConditionModel", SD_UNET_CONFIG),
    "pixart-digits": ("PixArtAlphaPipeline", "PixArtTransformer2DModel", PIXART_CONFIG),
}


def sample_timesteps(n: int, num_train_timesteps: int, gen: torch.Generator) -> torch.Tensor:
    """Half uniform, half with density rising linearly in t: more of the high-noise steps, where the
    prompt decides the digit's layout and slant (eps-MSE gives those little weight otherwise)."""
    u = torch.rand(n, generator=gen)
    u = torch.where(torch.rand(n, generator=gen) < 0.5, u, u.sqrt())
    return (u * num_train_timesteps).long().clamp_max(num_train_timesteps - 1)


def _encode(kind: str, text_encoder: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # As the pipelines do: SD feeds no attention mask (its padding is EOS under a causal mask), PixArt does.
    return text_encoder(ids, attention_mask=mask if kind == "pixart-digits" else None)[0]


def _denoise(kind: str, model: Any, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
    if kind == "sd-digits":
        return model(x, t, encoder_hidden_states=text).sample
    return model(
        x,
        encoder_hidden_states=text,
        encoder_attention_mask=mask,
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample


def train_pipeline(
    kind: str,
    out: Path,
    vae_dir: Path,
    steps: int,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float = 2e-3,
    ema_decay: float = 0.999,
    keep_attribute: float = 0.85,
    drop_prompt: float = 0.1,
    evaluate_seeds: int = 0,
) -> dict[str, Any]:
    """Train KIND's denoiser and text encoder jointly; write the pipeline folder (plus prompts.txt, training.json).

    Each training prompt names the digit and, each with probability `keep_attribute`, the image's measured
    thickness and slant words; `drop_prompt` of them are "" (the unconditional branch for guidance).
    """
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

    from zoo.models import build_text_encoder

    pipeline_class, model_class, config = KINDS[kind]
    batch_size = batch_size or BATCH_SIZE[kind]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    images, labels = load_digits16()
    latents = encode_mean(vae, images) * vae.config.scaling_factor
    measured = bins(measure(images), labels)
    prompt_ids, prompt_mask = tokenize(tokenizer, training_prompts())
    empty = len(prompt_ids) - 1

    text_encoder = build_text_encoder(tokenizer).train()
    model = (build_sd_unet() if kind == "sd-digits" else build_pixart()).train()
    modules = torch.nn.ModuleList([text_encoder, model])
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler(**TRAIN_SCHEDULER)
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, steps, max(1, min(200, steps // 10))))
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in tqdm(range(steps), desc=f"train {kind}", unit="step"):
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        keep = torch.rand(batch_size, 2, generator=gen) < keep_attribute
        thick = torch.where(keep[:, 0], measured["thickness"][idx] + 1, 0)
        slant = torch.where(keep[:, 1], measured["slant"][idx] + 1, 0)
        p = prompt_index(labels[idx], thick, slant)
        p[torch.rand(batch_size, generator=gen) < drop_prompt] = empty
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=gen)
        t = sample_timesteps(batch_size, noise_scheduler.config.num_train_timesteps, gen)
        text = _encode(kind, text_encoder, prompt_ids[p], prompt_mask[p])
        pred = _denoise(kind, model, noise_scheduler.add_noise(x0, noise, t), t, text, prompt_mask[p])
        loss = F.mse_loss(pred, noise)
        optimizer_step(loss, opt, sched, modules.parameters())
        ema_update(ema, modules, ema_decay, step)
        losses.append(loss.item())
    seconds, threads = time.time() - start, torch.get_num_threads()

    components = {
        "vae": vae,
        "text_encoder": ema[0],
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler.from_config({**TRAIN_SCHEDULER, **SAMPLING_SCHEDULER}),
    }
    if kind == "sd-digits":
        components |= {"unet": ema[1], "safety_checker": None, "feature_extractor": None}
        pipe = diffusers.StableDiffusionPipeline(**components, requires_safety_checker=False)
    else:
        pipe = diffusers.PixArtAlphaPipeline(**components, transformer=ema[1])
    pipe.set_progress_bar_config(disable=True)
    tail = losses[-200:]
    record: dict[str, Any] = {
        "pipeline": pipeline_class,
        "denoiser": {"class": model_class, "config": config},
        "text_encoder": {"class": "CLIPTextModel", "config": TEXT_ENCODER_CONFIG, "vocab_size": len(tokenizer)},
        "vae": str(vae_dir.name),
        "train_scheduler": {"class": "DDPMScheduler", "config": TRAIN_SCHEDULER},
        "sampling": {
            "scheduler": "DDIMScheduler",
            "config": SAMPLING_SCHEDULER,
            "num_inference_steps": DEFAULT_STEPS,
            "guidance_scale": DEFAULT_GUIDANCE,
        },
        "prompts": {
            "grammar": "'a [thin|regular|thick] [left-slanted|upright|right-slanted] <digit word>' or ''",
            "keep_attribute": keep_attribute,
            "drop_to_empty": drop_prompt,
            "attributes": {a: list(w) for a, w in ATTRIBUTES.items()},
            "tercile_edges_per_digit": {a: e.tolist() for a, e in tercile_edges().items()},
        },
        "training": {
            "data": f"{DATA}; all {len(images)} digits; latents = vae.encode(x).latent_dist.mean * scaling_factor",
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "ema_decay": ema_decay,
            "final_loss": sum(tail) / len(tail),
            "loss": "epsilon MSE, mean of the last 200 steps",
            "timesteps": "half uniform, half with density rising linearly in t (sample_timesteps)",
            "seconds": round(seconds, 1),
            "threads": threads,
            "command": f"python -m zoo train {kind} --steps {steps} --seed {seed} --threads {threads}",
        },
    }
    if evaluate_seeds:
        record["evaluation"] = evaluate_pipeline(pipe, seeds=evaluate_seeds)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "prompts.txt").write_text("\n".join(evaluation_prompts()) + "\n")
        write_json(tmp / "training.json", record)

    write_folder(out, write)
    return record
