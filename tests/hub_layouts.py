"""Tiny random-weight pipelines saved exactly as the hub lays them out (diffusers' own `save_pretrained`),
with each repository's scheduler config, pipeline class and weight files: what a user holds after
`huggingface-cli download`. Random weights: loading, equivalence and mechanics only, never fidelity.

| layout | as on the hub |
|---|---|
| sd15 | runwayml/stable-diffusion-v1-5: PNDM (PLMS, skip_prk_steps, steps_offset 1), safety checker |
| sd21v | stabilityai/stable-diffusion-2-1: DDIM, v-prediction |
| sdxl | stabilityai/stable-diffusion-xl-base-1.0: Euler (leading spacing), sharded UNet, fp32 + fp16 variant files |
| sd3 | stabilityai/stable-diffusion-3-medium-diffusers: flow matching, shift 3 |
| flux-schnell | black-forest-labs/FLUX.1-schnell: flow matching, shift 1, no guidance embedding |
| pixart-alpha | PixArt-alpha/PixArt-XL-2-1024-MS: DPM-Solver++ (`lambda_min_clipped: -Infinity`), old class name |
| pixart-sigma | PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: DPM-Solver++ |
| dit | facebook/DiT-XL-2-256: DDIM, `Transformer2DModel` with learned sigma, `id2label` |
| ddpm | google/ddpm-cifar10-32: DDPM, unconditional `UNet2DModel`, 1000 steps |
| lcm | SimianLuo/LCM_Dreamshaper_v7: LatentConsistencyModelPipeline, LCM scheduler, guidance-embedded UNet |

The T5 tokenizer slots hold the tiny CLIP tokenizer (a T5 vocabulary is a sentencepiece file we do not ship)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import (
    _tiny_clip,
    _tiny_flux_transformer,
    _tiny_sd3_transformer,
    _tiny_sd_unet,
    _tiny_t5,
    _tiny_vae,
    tiny_tokenizer,
)

# The repositories' scheduler configs (scheduler/scheduler_config.json), as diffusers wrote them.
SD15_PNDM = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_DDIM = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL_EULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
PIXART_DPM = {
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": float("-inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
DIT_DDIM = {"beta_schedule": "linear", "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon"}
CIFAR_DDPM = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
LCM = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
SD3_FLOW = {"num_train_timesteps": 1000, "shift": 3.0}
SCHNELL_FLOW = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
PROMPTS = "a thick seven\na thin one\n"
LAYOUTS = (
    *("sd15", "sd21v", "sdxl", "sd3", "flux-schnell", "pixart-alpha", "pixart-sigma"),
    *("dit", "ddpm", "lcm", "dance"),
)


def build(name: str, root: Path) -> Path:
    """The layout `name` saved under root/name (its pipeline's own save_pretrained)."""
    torch.manual_seed(0)
    folder = root / name
    BUILDERS[name](folder, root)
    if name not in ("dit", "ddpm", "dance"):
        (folder / "prompts.txt").write_text(PROMPTS)
    return folder


def _scheduler(cls_name: str, config: dict):
    import diffusers

    return getattr(diffusers, cls_name).from_config(config)


def _safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = {**text, "image_size": 32, "patch_size": 16}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return StableDiffusionSafetyChecker(config).eval(), CLIPImageProcessor(crop_size=32, size=32)


def _sd15(folder: Path, root: Path) -> None:
    from diffusers import StableDiffusionPipeline

    tok = tiny_tokenizer(root / "_tokenizer")
    checker, extractor = _safety_checker()
    StableDiffusionPipeline(
        vae=_tiny_vae(3),
        text_encoder=_tiny_clip(tok),
        tokenizer=tok,
        unet=_tiny_sd_unet(cross_attention_dim=32),
        scheduler=_scheduler("PNDMScheduler", SD15_PNDM),
        safety_checker=checker,
        feature_extractor=extractor,
        requires_safety_checker=True,
    ).save_pretrained(folder)


def _sd21v(folder: Path, root: Path) -> None:
    from diffusers import StableDiffusionPipeline

    tok = tiny_tokenizer(root / "_tokenizer")
    StableDiffusionPipeline(
        vae=_tiny_vae(3),
        text_encoder=_tiny_clip(tok),
        tokenizer=tok,
        unet=_tiny_sd_unet(cross_attention_dim=32),
        scheduler=_scheduler("DDIMScheduler", SD21_DDIM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def _sdxl(folder: Path, root: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    tok = tiny_tokenizer(root / "_tokenizer")
    # The second encoder (OpenCLIP bigG) is wider than the first and 10 blocks deep, as diffusers' single-file
    # loader tells the two apart by width and detects SDXL by block 9: hidden states 32 + 48 wide.
    unet = _tiny_sd_unet(
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 48,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(3, force_upcast=True),
        text_encoder=_tiny_clip(tok),
        text_encoder_2=_tiny_clip(tok, projection=True, layers=10, width=48),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=_scheduler("EulerDiscreteScheduler", SDXL_EULER),
    )
    # The hub ships fp32 files and an fp16 variant beside them; the UNet sharded.
    pipe.save_pretrained(folder, max_shard_size="100KB")
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16", max_shard_size="100KB")


def _sd3(folder: Path, root: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    tok = tiny_tokenizer(root / "_tokenizer")
    transformer = _tiny_sd3_transformer()
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler("FlowMatchEulerDiscreteScheduler", SD3_FLOW),
        vae=_tiny_vae(3, scaling_factor=1.5, shift_factor=0.1),
        text_encoder=_tiny_clip(tok, projection=True),
        tokenizer=tok,
        text_encoder_2=_tiny_clip(tok, projection=True),
        tokenizer_2=tok,
        text_encoder_3=_tiny_t5(tok, 64),
        tokenizer_3=tok,
    ).save_pretrained(folder)


def _flux_schnell(folder: Path, root: Path) -> None:
    from diffusers import FluxPipeline

    tok = tiny_tokenizer(root / "_tokenizer")
    transformer = _tiny_flux_transformer(guidance_embeds=False)
    FluxPipeline(
        transformer=transformer,
        scheduler=_scheduler("FlowMatchEulerDiscreteScheduler", SCHNELL_FLOW),
        vae=_tiny_vae(3, scaling_factor=1.5, shift_factor=0.1),
        text_encoder=_tiny_clip(tok),
        tokenizer=tok,
        text_encoder_2=_tiny_t5(tok, 32),
        tokenizer_2=tok,
    ).save_pretrained(folder)
    _edit_config(folder / "transformer" / "config.json", sample_size=8)  # Flux configs carry none


def _pixart(pipeline: str, folder: Path, root: Path) -> None:
    import diffusers
    from diffusers import PixArtTransformer2DModel

    tok = tiny_tokenizer(root / "_tokenizer")
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,  # learned sigma, as the hub's
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    getattr(diffusers, pipeline)(
        tokenizer=tok,
        text_encoder=_tiny_t5(tok, 32),
        vae=_tiny_vae(3),
        transformer=transformer,
        scheduler=_scheduler("DPMSolverMultistepScheduler", PIXART_DPM),
    ).save_pretrained(folder)
    if pipeline == "PixArtAlphaPipeline":  # the alpha repository's transformer predates the class
        _edit_config(folder / "transformer" / "config.json", _class_name="Transformer2DModel")


def _dit(folder: Path, root: Path) -> None:
    from diffusers import DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline's null class is label 1000
    )
    labels = {i: f"class {i}" for i in range(1000)}
    DiTPipeline(
        transformer=transformer, vae=_tiny_vae(3), scheduler=_scheduler("DDIMScheduler", DIT_DDIM), id2label=labels
    ).save_pretrained(folder)
    _edit_config(folder / "transformer" / "config.json", _class_name="Transformer2DModel")


def _ddpm(folder: Path, root: Path) -> None:
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=_scheduler("DDPMScheduler", CIFAR_DDPM)).save_pretrained(folder)


def _lcm(folder: Path, root: Path) -> None:
    from diffusers import LatentConsistencyModelPipeline

    tok = tiny_tokenizer(root / "_tokenizer")
    LatentConsistencyModelPipeline(
        vae=_tiny_vae(3),
        text_encoder=_tiny_clip(tok),
        tokenizer=tok,
        unet=_tiny_sd_unet(cross_attention_dim=32, time_cond_proj_dim=8),  # the w-embedding of LCM distillation
        scheduler=_scheduler("LCMScheduler", LCM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def _dance(folder: Path, root: Path) -> None:
    """Dance Diffusion (audio): UNet1DModel with its Fourier time features as extra input channels, IPNDM."""
    from diffusers import DanceDiffusionPipeline, IPNDMScheduler, UNet1DModel

    unet = UNet1DModel(
        sample_size=512,
        sample_rate=16000,
        in_channels=2,
        out_channels=2,
        extra_in_channels=16,
        time_embedding_dim=16,
        block_out_channels=(32, 32, 64),  # its 1-D attention takes a head per 32 channels
        time_embedding_type="fourier",
        flip_sin_to_cos=True,
        use_timestep_embedding=False,
    )
    DanceDiffusionPipeline(unet=unet, scheduler=IPNDMScheduler()).save_pretrained(folder)


def _edit_config(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


BUILDERS = {
    "sd15": _sd15,
    "sd21v": _sd21v,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux-schnell": _flux_schnell,
    "pixart-alpha": lambda folder, root: _pixart("PixArtAlphaPipeline", folder, root),
    "pixart-sigma": lambda folder, root: _pixart("PixArtSigmaPipeline", folder, root),
    "dit": _dit,
    "ddpm": _ddpm,
    "lcm": _lcm,
    "dance": _dance,
}
