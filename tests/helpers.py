"""Test-only helpers: tiny randomly initialised models for *equivalence* tests (never for fidelity)."""

import types

import torch
from torch import nn


class IdentityVAE(nn.Module):
    """Lets diffusers' DiTPipeline run on a pixel-space model: decode is the identity."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(scaling_factor=1.0)

    def decode(self, latents: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(sample=latents)


def tiny_dit(num_classes: int = 1000) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    ).eval()


def tiny_unet(num_class_embeds: int | None = None) -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def lower(program, folder):
    """Lower `program` with the ONNX Runtime backend, as the cpu targets do."""
    from backends.registry import get_backend

    return get_backend({"name": "onnxruntime"}).lower(program, folder)


def run_recipe(program, calibration, recipe, capabilities=frozenset({"fp32"}), reference=None, **context):
    """Run a recipe outside a job on given calibration trajectories (of `reference`, default `program`)."""
    import dataclasses

    from passes.manager import offline_context, plan_passes, run_passes

    ctx = offline_context(reference or program, calibration, capabilities)
    ctx = dataclasses.replace(ctx, **context)
    return run_passes(program, plan_passes(recipe, capabilities, program=program), ctx)
