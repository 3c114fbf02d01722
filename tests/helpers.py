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


WORDS = ("a", "thick", "thin", "seven", "one", "digit")


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer over a few words (generated vocab and merges; unknown words fall back to
    characters), max 16 tokens."""
    import json

    from transformers import CLIPTokenizer

    vocab, merges = {}, []
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_text_pipelines(root):
    """Tiny random SD (UNet2DConditionModel) and PixArt pipelines with one CLIP text encoder and a 1-channel
    VAE (16x16 images, 4x8x8 latents), saved under root/sd and root/pixart with a prompts.txt each.
    Random weights: for mechanics and equivalence only, never for fidelity."""
    from diffusers import (
        DDIMScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
        StableDiffusionPipeline,
    )

    torch.manual_seed(0)
    tok = tiny_tokenizer(root / "_tokenizer")
    encoder = _tiny_clip(tok)
    vae = _tiny_vae()
    unet = _tiny_sd_unet(cross_attention_dim=32)
    pixart = PixArtTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root / "sd")
    PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=encoder, vae=vae, transformer=pixart, scheduler=scheduler
    ).save_pretrained(root / "pixart")
    for name in ("sd", "pixart"):
        (root / name / "prompts.txt").write_text("a thick seven\na thin one\n# a comment\n\na digit\n")
    return {"sd": root / "sd", "pixart": root / "pixart"}


def tiny_sdxl_pipeline(root):
    """A tiny random SDXL pipeline (two CLIP encoders, the second with a projection; `text_time` UNet)
    with a prompts.txt. Mechanics and equivalence only."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    tok = tiny_tokenizer(root / "_tokenizer")
    first, second = _tiny_clip(tok), _tiny_clip(tok, projection=True)
    unet = _tiny_sd_unet(
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    )
    vae = _tiny_vae()
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    ).save_pretrained(root / "sdxl")
    (root / "sdxl" / "prompts.txt").write_text("a thick seven\na thin one\n")
    return root / "sdxl"


def _tiny_sd_unet(**conditioning):
    """An SD-style UNet2DConditionModel over 4x8x8 latents, cross-attention at the 8x8 level."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=8,
        **conditioning,
    )


def _tiny_clip(tok, projection: bool = False, layers: int = 2, width: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        projection_dim=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * width,
        max_position_embeddings=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _tiny_t5(tok, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tok), d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8
    )
    return T5EncoderModel(config).eval()


def _tiny_vae(channels: int = 1, **options):
    """A VAE over 16x16 images of `channels` channels (1: the zoo's digits; 3: RGB, as every hub repository
    has), 4x8x8 latents; `options`: SD3/Flux-style `scaling_factor`, `shift_factor`, `force_upcast`."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
        **options,
    )


def _tiny_sd3_transformer():
    """An MMDiT over 4x8x8 latents: two joint blocks, 64-wide prompt embeddings and pooled projections."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        pos_embed_max_size=8,
    )


def _tiny_flux_transformer(guidance_embeds: bool):
    """A Flux transformer over 2x2-packed 16-channel latents: one double- and one single-stream block."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_sd3_pipeline(root):
    """A tiny random SD3 pipeline: two CLIPs with projections and a T5 encoder (the tiny CLIP tokenizer
    in every tokenizer slot), an MMDiT, a shifted flow-matching scheduler. Mechanics only."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok = tiny_tokenizer(root / "_tokenizer")
    transformer = _tiny_sd3_transformer()
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(scaling_factor=1.5, shift_factor=0.1),
        text_encoder=_tiny_clip(tok, projection=True),
        tokenizer=tok,
        text_encoder_2=_tiny_clip(tok, projection=True),
        tokenizer_2=tok,
        text_encoder_3=_tiny_t5(tok, 64),
        tokenizer_3=tok,
    ).save_pretrained(root / "sd3")
    (root / "sd3" / "prompts.txt").write_text("a thick seven\na thin one\n")
    return root / "sd3"


def tiny_flux_pipeline(root):
    """A tiny random FLUX.1-dev-style pipeline (CLIP + T5, guidance-embedded transformer with one double-
    and one single-stream block, dynamic-shift flow matching); its config carries `sample_size` 8
    (Flux configs have none). Mechanics only."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    tok = tiny_tokenizer(root / "_tokenizer")
    transformer = _tiny_flux_transformer(guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_tiny_vae(scaling_factor=1.5, shift_factor=0.1),
        text_encoder=_tiny_clip(tok),
        tokenizer=tok,
        text_encoder_2=_tiny_t5(tok, 32),
        tokenizer_2=tok,
    ).save_pretrained(root / "flux")
    config_path = root / "flux" / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sample_size": 8}))
    (root / "flux" / "prompts.txt").write_text("a thick seven\na thin one\n")
    return root / "flux"


def tiny_user_models(root):
    """Models no shipped judge knows everything about, saved exactly as diffusers' save_pretrained lays
    them out: an SD-style pipeline with an RGB VAE (3x32x32 images from 4x8x8 latents, prompts that name
    no digit) and a class-conditional pixel DiT over 3x32x32 samples (1000 classes) as a model folder.
    Random weights: mechanics only, never fidelity."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, StableDiffusionPipeline

    torch.manual_seed(0)
    tok = tiny_tokenizer(root / "_tokenizer")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=_tiny_clip(tok),
        tokenizer=tok,
        unet=_tiny_sd_unet(cross_attention_dim=32),
        scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root / "sd-rgb")
    (root / "sd-rgb" / "prompts.txt").write_text("a thick digit\na thin digit\n")
    DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=3,
        num_layers=4,  # a quarter of the stack is one block (the structure recipes' layer removal)
        sample_size=32,
        patch_size=4,
        num_embeds_ada_norm=1000,
    ).save_pretrained(root / "dit-rgb")
    return {"sd": root / "sd-rgb", "dit": root / "dit-rgb"}


def verdict_from_report(report):
    """(exit code, failed gates, unmeasured gates) recomputed from report.json alone: its verification
    values against its gates, the ones that do not apply to the model left out, nothing measured a FAIL."""
    import math

    from verify.gates import GATES

    failed, unmeasured, held = [], [], []
    for name, bound in report["gates"].items():
        if name in report["gates_not_applicable"]:
            continue
        gate = GATES[name]
        value = report["verification"].get(gate.metric)
        if value is None:
            unmeasured.append(name)
        elif math.isfinite(value) and (value >= bound if gate.kind == "min" else value <= bound):
            held.append(name)
        else:
            failed.append(name)
    return (0 if held and not failed and not unmeasured else 1), failed, unmeasured


def assert_exit_matches_report(result, out):
    """The exit code and the verdict line are what the written report's own numbers say."""
    import json

    assert (out / "report.json").is_file(), result.output
    report = json.loads((out / "report.json").read_text())
    code, failed, unmeasured = verdict_from_report(report)
    assert result.exit_code == code, result.output
    verdict = result.output.strip().splitlines()[-1]
    if code == 0:
        assert verdict == "PASS"
    else:
        assert verdict.startswith("FAIL: ") and all(g in verdict for g in failed + unmeasured), verdict
    return report


# Training budgets of the shipped recipes, cut for mechanics (tests of verdicts and plumbing, not quality).
SHORT = {  # training budgets of the shipped recipes, cut for mechanics
    "recover": {"steps": 2, "teacher_samples": 2, "samples": 64, "batch": 8},
    # The distribution checks run, on 4 samples; the loop changes keep any ratio (random weights).
    "guidance_distill": {"steps": 2, "max_steps": 4, "samples": 4, "batch": 4, "check_samples": 4},
    "progressive_distill": {"round_steps": 2, "samples": 4, "batch": 4, "max_fd_shift": 100.0, "check_samples": 4},
    "cache": {"max_fd_shift": 100.0, "check_samples": 4},
    "linearize": {"steps": 2, "samples": 64, "batch": 8, "min_calibration_psnr_db": 0.0},
    "quantize": {"check_samples": 4},
}
SEARCH = {"trials": 1, "startup_trials": 1, "finalists": 1, "proxy_samples": 2, "latency_repeats": 1}


def shortened(name: str, folder, first: dict | None = None) -> str:
    """The shipped target `name` with its training budgets cut (SHORT) and a search target's search cut to one
    trial (SEARCH): its first listed recipe, or `first` (knob -> choice)."""
    import json

    from optimizer.targets import TARGETS_DIR

    data = json.loads((TARGETS_DIR / f"{name}.json").read_text())
    recipes = [data["recipe"], *data.get("alternatives", [])]
    if "search" in data:
        data["search"].update(SEARCH)
        data["search"]["first"] = [first] if first else data["search"].get("first", [])[:1]
        recipes += [fragment for knob in data["search"]["knobs"].values() for fragment in knob.values()]
    for recipe in recipes:
        for step in recipe:
            step.setdefault("config", {}).update(SHORT.get(step["pass"], {}))
    path = folder / f"{name}-short.json"
    path.write_text(json.dumps(data))
    return str(path)


def invoke(*args):
    """`optimize` in this process, every argument as a string; exceptions propagate."""
    from click.testing import CliRunner

    from optimizer.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def with_pusht_observations(program, rows: int = 8):
    """A PushT policy with an observation set of `rows` random raw observations (as the env reports them)."""
    import dataclasses

    from core.environments import pusht

    observed = {pusht.STATE: torch.rand(rows, 2, 2) * 512, pusht.ENV_STATE: torch.rand(rows, 2, 16) * 512}
    return program.replace(stages=dataclasses.replace(program.stages, observations=observed))


def assert_same_actions(program, want: nn.Module, got: nn.Module) -> None:
    """Two denoisers of a tiny PushT policy (horizon 8) give the same outputs on random inputs."""
    from core.adapters import denoiser_module

    x, t = torch.randn(2, 8, 2), torch.tensor([90.0, 10.0])
    obs = (torch.randn(2, 2, 2), torch.randn(2, 2, 16))
    with torch.no_grad():
        expected = denoiser_module(program.replace(denoiser=want))(x, t, *obs)
        actual = denoiser_module(program.replace(denoiser=got))(x, t, *obs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def tiny_transformer_policy(weights, environment: str | None = "pusht", **changes) -> None:
    """A tiny PushT action transformer (horizon 8, 4 blocks, random weights) saved as our checkpoint at `weights`."""
    from core.checkpoint import save_checkpoint
    from core.networks.action_transformer import ActionTransformer

    STATE, ENV_STATE = "observation.state", "observation.environment_state"
    torch.manual_seed(0)
    config = {
        "horizon": 8,
        "action_dim": 2,
        "observations": [[STATE, 2], [ENV_STATE, 16]],
        "n_obs_steps": 2,
        "n_action_steps": 4,
        "num_layers": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "mlp_ratio": 2,
        "diffusion_step_embed_dim": 16,
        "normalization": {
            STATE: [[256.0, 256.0], [256.0, 256.0]],
            ENV_STATE: [[256.0] * 16, [256.0] * 16],
            "action": [[256.0, 256.0], [256.0, 256.0]],
        },
        **changes,
    }
    model = ActionTransformer(**config)
    for p in model.parameters():  # adaLN-Zero starts as the identity: perturb so every block matters
        torch.nn.init.normal_(p, std=0.2)
    meta = {
        "model": {"class": "ActionTransformer", "config": config},
        "scheduler": {"class": "DDPMScheduler", "config": {"num_train_timesteps": 100, "clip_sample": True}},
        "sampling": {"scheduler": "DDPMScheduler", "num_inference_steps": 4, "guidance_scale": 1.0},
    }
    if environment is not None:
        meta["environment"] = environment
    save_checkpoint(weights, model.state_dict(), meta)
