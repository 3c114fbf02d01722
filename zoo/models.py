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
