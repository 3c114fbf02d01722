"""Single-file checkpoints for the tests: a diffusers SD pipeline's weights renamed to the original LDM
(CompVis / A1111) key layout, as `v1-5-pruned-emaonly.safetensors` holds them: `model.diffusion_model.*`
(the UNet: input_blocks / middle_block / output_blocks), `first_stage_model.*` (the VAE, its attention as
1x1 convolutions) and `cond_stage_model.transformer.*` (the CLIP text encoder). The names follow the
LDM code's module layout; diffusers' own single-file loader converts them back (tests/core/test_single_file.py
checks that the round trip reproduces the diffusers pipeline). Written for the tiny test pipelines."""

from __future__ import annotations

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}
RESNET |= {"norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_keys(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers UNet2DConditionModel name -> LDM name (without the `model.diffusion_model.` prefix)."""
    n = unet.config.layers_per_block
    levels = len(unet.down_blocks)
    table = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0"}
    table |= {"time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    table |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's
    for level, block in enumerate(unet.down_blocks):
        for j in range(n):
            at = f"input_blocks.{1 + level * (n + 1) + j}"
            table[f"down_blocks.{level}.resnets.{j}"] = f"{at}.0"
            if getattr(block, "attentions", None):
                table[f"down_blocks.{level}.attentions.{j}"] = f"{at}.1"
        if block.downsamplers:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{1 + level * (n + 1) + n}.0.op"
    table |= {"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1"}
    table["mid_block.resnets.1"] = "middle_block.2"
    for level, block in enumerate(unet.up_blocks):
        attention = bool(getattr(block, "attentions", None))
        for j in range(n + 1):
            at = f"output_blocks.{level * (n + 1) + j}"
            table[f"up_blocks.{level}.resnets.{j}"] = f"{at}.0"
            if attention:
                table[f"up_blocks.{level}.attentions.{j}"] = f"{at}.1"
        if block.upsamplers and level < levels - 1:
            last = f"output_blocks.{level * (n + 1) + n}"
            table[f"up_blocks.{level}.upsamplers.0.conv"] = f"{last}.{2 if attention else 1}.conv"
    return table


def vae_keys(vae: torch.nn.Module) -> dict[str, str]:
    """diffusers AutoencoderKL name -> LDM name (without `first_stage_model.`)."""
    levels = len(vae.encoder.down_blocks)
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        table |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out"}
        table |= {f"{part}.conv_norm_out": f"{part}.norm_out", f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"}
        table |= {
            f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
            f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
        }
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        if block.downsamplers:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
        if block.upsamplers:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    return table


def _rename(state: dict[str, torch.Tensor], table: dict[str, str], inner: dict[str, str]) -> dict[str, torch.Tensor]:
    """Each key under a table prefix renamed; `inner` renames the rest of the name (resnet / attention parts)."""
    out = {}
    for key, value in state.items():
        prefix = max((p for p in table if key == p or key.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            raise KeyError(f"no LDM name for {key}")
        rest = key[len(prefix) + 1 :]
        part = max((p for p in inner if rest == p or rest.startswith(p + ".")), key=len, default=None)
        if part is not None:
            rest = inner[part] + rest[len(part) :]
        out[f"{table[prefix]}.{rest}" if rest else table[prefix]] = value
    return out


def open_clip(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection as OpenCLIP holds it (SDXL's second text encoder): one
    in_proj of q, k and v per block, the projection stored transposed."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    parts["self_attn.out_proj"] = "attn.out_proj"
    for i in range(encoder.config.num_hidden_layers):
        at = f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{at}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
            for ours, theirs in parts.items():
                out[f"transformer.resblocks.{i}.{theirs}.{kind}"] = state.pop(f"{at}.{ours}.{kind}")
    assert not state, f"no OpenCLIP name for {sorted(state)}"
    return out


def ldm_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """The SD pipeline's UNet, VAE and CLIP text encoder(s) in one LDM-layout state dict: SD 1.x's
    `cond_stage_model.transformer`, or SDXL's `conditioner.embedders.0.transformer` (CLIP-L as transformers
    holds it) and `conditioner.embedders.1.model` (OpenCLIP bigG, see open_clip)."""
    state = {}
    unet = _rename(pipe.unet.state_dict(), unet_keys(pipe.unet), RESNET)
    state |= {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    vae = _rename(pipe.vae.state_dict(), vae_keys(pipe.vae), {"conv_shortcut": "nin_shortcut", **VAE_ATTENTION})
    for key, value in vae.items():
        attention = ".attn_1." in key and value.dim() == 2  # LDM's VAE attention: 1x1 convolutions
        state[f"first_stage_model.{key}"] = value[:, :, None, None] if attention else value
    # LDM holds transformers' CLIPTextModel as it was saved (under `text_model.`, which transformers >= 5.6
    # no longer nests its own names in).
    second = getattr(pipe, "text_encoder_2", None)
    clip = "conditioner.embedders.0.transformer" if second is not None else "cond_stage_model.transformer"
    for key, value in pipe.text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        state[f"{clip}.{name}"] = value
    if second is not None:
        state |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip(second).items()}
    return {k: v.contiguous() for k, v in state.items()}
