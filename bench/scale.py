"""`optimize bench DIR --scale GEOMETRY`: an artifact's decisions applied to a realistic geometry with
random weights, original vs optimized timed side by side in the artifact's backend.

The shipped models are toys whose loops are overhead-bound (a few ms per step), so what INT8, pruning
or caching buy at deployment size cannot show on them. Latency does not depend on weight values, so the
chosen decisions are replayed on a network of the same family at a realistic size:

- the loop (scheduler, steps, timesteps, guidance and its per-step policy): the artifact's plan as is;
- structure: the same fraction of blocks removed (the last ones: which ones does not change the cost)
  and the same fractions of heads, MLP units and channels pruned (by weight magnitude);
- numbers: the quantize pass with the artifact's config on one calibration trajectory of the scaled
  network, and the layers the artifact kept fp32 kept fp32;
- weights-only passes (recovery distillation) change nothing here: a distilled student has its
  teacher's architecture.

Fidelity is not measured here (random weights); it is the trained model's, in the artifact's report.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.registry import get_backend
from calibration.capture import capture_calibration, evaluation_set
from core.errors import ConfigError
from core.ir import Conditioning, DiffusionProgram, SamplingPlan
from core.loading import program_from_model
from core.quantized import quantized_layers
from core.sampling import network_evaluations
from passes.manager import offline_context, plan_passes, run_passes
from verify.timing import paired_median_ms


@dataclass(frozen=True)
class Geometry:
    name: str
    model_class: str
    config: dict[str, Any]
    num_classes: int
    description: str


def dit_config(layers: int, heads: int, head_dim: int, latent: int = 32, channels: int = 4) -> dict[str, Any]:
    """A class-conditional DiT (adaLN-Zero, patch 2, 1000 classes) of the given size."""
    return dict(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=channels,
        num_layers=layers,
        sample_size=latent,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_eps=1e-6,
    )


GEOMETRIES = {
    g.name: g
    for g in (
        Geometry(
            "dit-b2",
            "DiTTransformer2DModel",
            dit_config(layers=12, heads=12, head_dim=64),
            1000,
            "DiT-B/2 shape (12 blocks, width 768, patch 2) at 32x32x4 latents (256 px), 1000 classes",
        ),
        Geometry(
            "dit-b2-512",
            "DiTTransformer2DModel",
            dit_config(layers=12, heads=12, head_dim=64, latent=64),
            1000,
            "DiT-B/2 shape at 64x64x4 latents (512 px): 1024 tokens, where attention starts to weigh",
        ),
        Geometry(
            "dit-xl2",
            "DiTTransformer2DModel",
            dit_config(layers=28, heads=16, head_dim=72),
            1000,
            "DiT-XL/2 shape (28 blocks, width 1152, patch 2) at 32x32x4 latents (256 px), 1000 classes",
        ),
        Geometry(
            "unet-sd",
            "UNet2DModel",
            dict(
                sample_size=64,
                in_channels=4,
                out_channels=4,
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
                attention_head_dim=40,
                norm_num_groups=32,
                num_class_embeds=1001,
            ),
            1000,
            "SD-UNet-shaped UNet2DModel (channels 320/640/1280/1280, 2 resnets per level, self-attention at the"
            " first three levels) at 64x64x4 latents (512 px), 1000 classes (no cross-attention)",
        ),
    )
}
SHAPE_PASSES = {"layer_removal": {"criterion": "last"}, "prune": {"criterion": "magnitude"}}
WEIGHTS_ONLY = {"recover"}
LOOP_PASSES = {"sampler", "schedule", "guidance_distill", "progressive_distill", "guidance", "cache"}
ALL_CAPABILITIES = frozenset({"fp32", "int8", "fp8", "int4-weights", "nvfp4"})


def scaled_original(geometry: Geometry, plan: SamplingPlan) -> DiffusionProgram:
    """The geometry with random weights (seeded) and the artifact's original loop."""
    from core.adapters import adapter_for

    torch.manual_seed(0)
    model = adapter_for(geometry.model_class).build(dict(geometry.config))
    program = program_from_model(
        model,
        scheduler={"class": plan.scheduler_class, "config": plan.scheduler_config},
        sampling={
            "scheduler": plan.scheduler_class,
            "num_inference_steps": plan.num_inference_steps,
            "guidance_scale": plan.guidance_scale,
        },
        conditioning=Conditioning(geometry.num_classes, geometry.num_classes),
    )
    return program.replace(plan=plan.without_loop_policy())


def scaled_recipe(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The artifact's applied passes as a recipe for the scaled network: shapes and formats, not weights."""
    recipe = []
    for record in report["passes"]:
        name, config = record["name"], dict(record["config"])
        if name in SHAPE_PASSES:
            config.update(SHAPE_PASSES[name])
            if name == "layer_removal":
                decision = report["decisions"]["layer_removal"]
                if not decision["removed"]:  # e.g. a UNet: no stack of same-shape blocks, nothing removed
                    continue
                depth = len(decision["removed"]) + len(decision["kept"])
                config.update(fraction=len(decision["removed"]) / depth, blocks=0)
            recipe.append({"pass": name, "config": config})
        elif name == "quantize":  # the formats the artifact chose per layer (fp32 fallbacks too), no new choice
            decision = report["decisions"].get("quantize", {})
            reverted = {f["layer"]: "fp32" for f in decision.get("fallback", [])}
            assigned = (decision.get("allocation") or {}).get("assigned", {})
            pinned = {**config.get("layer_weights", {}), **reverted, **assigned}
            # Ranges from 2 inputs: the values do not change the cost, and 256 rows of an SD-sized UNet at
            # 64x64 take many minutes on a CPU.
            replay = {"max_eps_error": 0.0, "max_sample_error": 0.0, "layer_weights": pinned, "calibration_inputs": 2}
            recipe.append({"pass": name, "config": {**config, **replay}})
        elif name == "linearize":  # the same mechanism on the same share of the stack (after any budget), untrained
            decision = report["decisions"]["linearize"]
            share = len(decision["replaced"]) / decision["depth"]
            selection = "all" if share == 1 else "last"
            replay = {
                "selection": selection,
                "fraction": share,
                "blocks": 0,
                "steps": 0,
                "min_calibration_psnr_db": 0.0,
            }
            recipe.append({"pass": name, "config": {**config, **replay}})
        elif name not in WEIGHTS_ONLY and name not in LOOP_PASSES:
            raise ConfigError(f"bench --scale: pass '{name}' has no scaled replay yet")
    return recipe


def scaled_candidate(original: DiffusionProgram, report: dict[str, Any]) -> DiffusionProgram:
    candidate_plan = SamplingPlan.from_dict(report["candidate_plan"])
    if candidate_plan.cache is not None:
        raise ConfigError("bench --scale: cache schedules are not mapped to other geometries yet")
    on_loop = original.replace(plan=candidate_plan.without_loop_policy())
    calibration = capture_calibration(on_loop, 1)  # ranges for the formats; values do not change the cost
    ctx = offline_context(on_loop, calibration, ALL_CAPABILITIES)  # the artifact's target checked them already
    program = run_passes(on_loop, plan_passes(scaled_recipe(report), ALL_CAPABILITIES, program=on_loop), ctx)
    return program.replace(plan=candidate_plan)


def compare_at_scale(
    report: dict[str, Any],
    backend_options: dict[str, Any],
    geometry: Geometry,
    repeats: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Whole loops for one image, the scaled original and the scaled artifact, side by side."""
    if report["model"]["class"] != geometry.model_class:
        raise ConfigError(
            f"bench --scale {geometry.name}: the artifact is a {report['model']['class']}, the geometry a "
            f"{geometry.model_class}; geometries for it: {', '.join(names_for(report['model']['class'])) or 'none yet'}"
        )
    original = scaled_original(geometry, SamplingPlan.from_dict(report["plan"]))
    log(f"{geometry.name}: replaying {', '.join(p['name'] for p in report['passes']) or 'no passes'}")
    candidate = scaled_candidate(original, report)
    backend = get_backend(backend_options)
    seeds, conditions = evaluation_set(original, 1, 0)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        loops, stats = {}, {}
        for key, program in (("original", original), ("artifact", candidate)):
            folder = Path(tmp) / key
            folder.mkdir()
            log(f"{geometry.name}: lowering the {key}")
            files = backend.lower(program, folder)
            runner = backend.runner(folder)
            loops[key] = lambda r=runner: r.sample(seeds, conditions)
            stats[key] = {
                "parameters": sum(p.numel() for p in program.denoiser.parameters()),
                "quantized_layers": len(quantized_layers(program.denoiser)),
                "onnx_bytes": files["onnx_bytes"],
                "nfe": network_evaluations(program.plan, program.spec.conditioning),
                "steps": program.plan.num_inference_steps,
            }
        log(f"{geometry.name}: timing whole loops side by side ({repeats} each)")
        ms = paired_median_ms(loops, repeats=repeats, warmup=1, rounds=min(repeats, 2))
    return {
        "geometry": geometry.name,
        "description": geometry.description,
        "weights": "random (latency does not depend on weight values; fidelity is the trained model's)",
        "original": {**stats["original"], "loop_ms": ms["original"]},
        "artifact": {**stats["artifact"], "loop_ms": ms["artifact"]},
        "speedup": ms["original"] / ms["artifact"],
        "replayed": [p["name"] for p in report["passes"]],
        "threads": torch.get_num_threads(),
    }


def names_for(model_class: str) -> list[str]:
    return [g.name for g in GEOMETRIES.values() if g.model_class == model_class]
