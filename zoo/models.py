"""Architectures of the in-tree reference models (the zoo)."""

from __future__ import annotations

import torch
from torch import nn

from zoo.data import IMAGE_SIZE, NUM_CLASSES

DIT_CONFIG = {
    "num_attention_heads": 6,
    "attention_head_dim": 16,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 8,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
    "norm_eps": 1e-6,
}

# The class table has NUM_CLASSES + 1 rows: the last is the null class for classifier-free guidance.
UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "num_class_embeds": NUM_CLASSES + 1,
}


def build_dit() -> nn.Module:
    """DiT with adaLN-Zero init: every block and the final layer start as the identity / zero."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**DIT_CONFIG)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
        # Label dropout for guidance is done once per sample by the trainer, not per block.
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def build_unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


class DigitsClassifier(nn.Module):
    """Small CNN on 16x16 digits; `features` is the penultimate embedding used for Fréchet distance."""

    FEATURE_DIM = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, self.FEATURE_DIM, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(self.FEATURE_DIM, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# Text-to-image latent diffusion (the pipeline folders): a VAE to 4x8x8 latents, a tiny CLIP text encoder,
# an SD-style UNet and a PixArt-style transformer over the latents.
LATENT_SHAPE = (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
VAE_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": LATENT_SHAPE[0],
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
}
TEXT_HIDDEN = 64
TEXT_ENCODER_CONFIG = {
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "hidden_act": "gelu",
}
SD_UNET_CONFIG = {
    "sample_size": LATENT_SHAPE[1],
    "in_channels": LATENT_SHAPE[0],
    "out_channels": LATENT_SHAPE[0],
    # Cross-attention at the 4x4 level (and the mid block), where the digit's layout and slant are decided;
    # the 8x8 level is plain ResNets.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_HIDDEN,
    "attention_head_dim": 4,  # diffusers' legacy name: the head *count* (4 heads of 16 dims at 64 channels)
    "norm_num_groups": 8,
}
PIXART_CONFIG = {
    "sample_size": LATENT_SHAPE[1],
    "patch_size": 2,
    "in_channels": LATENT_SHAPE[0],
    "out_channels": LATENT_SHAPE[0],
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "cross_attention_dim": 64,
    "caption_channels": TEXT_HIDDEN,
    "norm_type": "ada_norm_single",
    "use_additional_conditions": False,
}


def build_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_text_encoder(tokenizer) -> nn.Module:  # tokenizer: CLIPTokenizer
    """A tiny CLIP text encoder over the tokenizer's vocabulary (special token ids taken from it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER_CONFIG,
    )
    return CLIPTextModel(config)


def build_sd_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**SD_UNET_CONFIG)


def build_pixart() -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**PIXART_CONFIG)
