"""Issue 33: models as users hold them. The hub-layout fixture set (tests/hub_layouts.py: tiny random weights
in each repository's layout, scheduler config and weight files) loads with its pipeline's own defaults,
its loop reproduces diffusers' own pipeline for the same seeds, and cpu-fp32 lowers it with ONNX Runtime
matching torch. Random weights: mechanics and equivalence only, never fidelity."""

import dataclasses
import json

import diffusers
import pytest
import torch
from click.testing import CliRunner
from hub_layouts import LAYOUTS

from core.loading import load_program
from core.sampling import model_calls, to_images, with_scheduler
from core.stages import decode
from core.variants import sample_program
from optimizer.cli import main

PROMPTS = ["a thick seven", "a thin one"]
# What diffusers' own pipelines run by default (their __call__ signatures; the scheduler the folder ships):
# scheduler class, steps, classifier-free guidance scale, our family.
EXPECTED = {
    "sd15": ("PNDMScheduler", 50, 7.5, "sd-unet"),
    "sd21v": ("DDIMScheduler", 50, 7.5, "sd-unet"),
    "sdxl": ("EulerDiscreteScheduler", 50, 5.0, "sd-unet"),
    "sd3": ("FlowMatchEulerDiscreteScheduler", 28, 7.0, "sd3"),
    "flux-schnell": ("FlowMatchEulerDiscreteScheduler", 28, 1.0, "flux"),  # true_cfg_scale 1: no CFG
    "pixart-alpha": ("DPMSolverMultistepScheduler", 20, 4.5, "pixart"),
    "pixart-sigma": ("DPMSolverMultistepScheduler", 20, 4.5, "pixart"),
    "dit": ("DDIMScheduler", 50, 4.0, "dit"),
    "ddpm": ("DDPMScheduler", 1000, 1.0, "unet"),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_hub_layout_loads_with_its_pipelines_own_defaults(hub, name):
    program = load_program(hub[name])
    scheduler, steps, guidance, family = EXPECTED[name]
    assert program.plan.scheduler_class == scheduler and program.spec.family == family
    assert (program.plan.num_inference_steps, program.plan.guidance_scale) == (steps, guidance)
    assert program.spec.prediction_type == {"sd21v": "v_prediction", "sd3": "flow", "flux-schnell": "flow"}.get(
        name, "epsilon"
    )
    # Third-party configs as diffusers reads them: PixArt's `lambda_min_clipped: -Infinity` is its class default,
    # left out of the plan (plain JSON), which diffusers restores.
    assert "lambda_min_clipped" not in program.plan.scheduler_config
    json.dumps(program.plan.to_dict(), allow_nan=False)
    notes = program.source.notes
    assert any("safety_checker" in n and "requires_safety_checker true" in n for n in notes) == (name == "sd15")
    assert any("unet: plain files (safetensors, " in n for n in notes) == (name == "sdxl")  # shards named


def test_pndm_and_second_order_steps_count_model_calls(hub):
    """PLMS warm-up calls the model n + 1 times for n steps, Heun 2n - 1: the plan's entries are model calls."""
    plan = dataclasses.replace(load_program(hub["sd15"]).plan, num_inference_steps=10)
    assert model_calls(plan) == 11
    assert model_calls(with_scheduler(plan, "HeunDiscreteScheduler")) == 19


def theirs(folder, name, program, seeds, steps):
    """diffusers' own pipeline for the folder (loaded in float32, as our report states), same seeds."""
    index = json.loads((folder / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": steps, "generator": [torch.Generator().manual_seed(s) for s in seeds]}
    if name == "ddpm":
        images = pipe(batch_size=len(seeds), output_type="np", **kwargs).images
        return torch.from_numpy(images).permute(0, 3, 1, 2)
    if name == "dit":
        images = pipe(class_labels=[1, 2], guidance_scale=program.plan.guidance_scale, output_type="np", **kwargs)
        return torch.from_numpy(images.images).permute(0, 3, 1, 2)
    extra = {"sd3": {"height": 16, "width": 16}, "flux-schnell": {"height": 16, "width": 16}}.get(name, {})
    if name.startswith("pixart"):
        extra = {"max_sequence_length": 16, "use_resolution_binning": False}
    guidance = {"guidance_scale": program.plan.guidance_scale} if name != "flux-schnell" else {}
    latents = pipe(prompt=PROMPTS, output_type="latent", **guidance, **kwargs, **extra).images
    return pipe._unpack_latents(latents, 16, 16, pipe.vae_scale_factor) if name == "flux-schnell" else latents


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_loop_reproduces_diffusers_own_pipeline(hub, name):
    steps = 4
    program = load_program(hub[name])
    program = program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=steps))
    reference = theirs(hub[name], name, program, [0, 1], steps)
    if name == "ddpm":  # stochastic: the per-sample generators draw DDPM's noise as diffusers' do
        ours = to_images(sample_program(program, [0, 1], None))
    elif name == "dit":  # learned sigma split off, guidance on the eps half, VAE decode
        ours = to_images(decode(program.stages, sample_program(program, [0, 1], [1, 2])))
    else:
        ours = sample_program(program, [0, 1], PROMPTS)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_cpu_fp32_lowers_a_hub_layout_with_ort_matching_torch(hub, name, tmp_path):
    out = tmp_path / "out"
    fast = ["--samples", "3", "--calibration-samples", "2", "--latency-repeats", "0", "--steps", "3"]
    result = CliRunner().invoke(main, [str(hub[name]), "--out", str(out), *fast])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["psnr_db_min"] >= 60  # the lowered loop is the torch loop
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["steps"]) == len(plan["timesteps"]) == (4 if name == "sd15" else 3)  # PLMS: 4 calls, 3 steps
    assert "digits" not in report["verification"]["judges"]  # RGB outputs: no digits judge
    assert report["model"]["source"]["notes"] == list(load_program(hub[name]).source.notes)
