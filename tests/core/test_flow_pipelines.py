"""SD3 (MMDiT) and Flux pipeline folders, tiny random weights (mechanics only, no fidelity claim):
flow-matching sampling reproduces diffusers' own pipelines, and cpu-fp32 lowers every stage with ONNX
Runtime matching torch."""

import dataclasses
import json

import diffusers
import pytest
import torch
from click.testing import CliRunner

from core.errors import ConfigError
from core.loading import load_program
from core.variants import sample_program
from optimizer.cli import main
from passes.manager import plan_passes

PROMPTS = ["a thick seven", "a thin one"]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_matching_loop_reproduces_the_diffusers_pipeline(flow_folders, name):
    folder = flow_folders[name]
    program = load_program(folder)
    assert program.spec.family == name and program.spec.prediction_type == "flow"
    assert program.spec.sample_shape == (4, 8, 8)
    if name == "flux":  # dynamic shift from 16 packed tokens, linear sigmas, embedded guidance, no CFG
        assert program.plan.linear_sigmas and program.plan.mu == pytest.approx(0.5 + 0.65 / 3840 * (16 - 256))
        assert program.plan.guidance_scale == 1.0
    else:
        assert program.plan.mu is None and program.plan.guidance_scale == 7.0
    program = program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=4))
    ours = sample_program(program, [0, 1], PROMPTS)

    pipe = getattr(diffusers, diffusers.DiffusionPipeline.load_config(folder)["_class_name"]).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"guidance_scale": 7.0, "max_sequence_length": 256} if name == "sd3" else {"guidance_scale": 3.5}
    ref = pipe(
        PROMPTS,
        num_inference_steps=4,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="latent",
        height=16,
        width=16,
        **kwargs,
    ).images
    if name == "flux":
        ref = pipe._unpack_latents(ref, 16, 16, pipe.vae_scale_factor)
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-5)


def test_cpu_fp32_lowers_a_guidance_embedded_flux_pipeline_with_ort_matching_torch(flow_folders, tmp_path):
    """The FLUX.1-dev-style folder: the guidance embedding and the dynamic shift (mu) that FLUX.1-schnell's
    hub layout has not (SD3 and schnell lower in tests/core/test_hub_layouts.py)."""
    out = tmp_path / "out"
    fast = ["--samples", "2", "--calibration-samples", "1", "--latency-repeats", "0", "--steps", "3"]
    result = CliRunner().invoke(main, [str(flow_folders["flux"]), "--out", str(out), *fast], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {"denoiser.onnx", "prompt_encoder.onnx", "decoder.onnx", "tokenizer_2"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["space"] == "decoded images" and report["verification"]["psnr_db_min"] >= 60
    plan = json.loads((out / "plan.json").read_text())["sampling"]
    assert plan["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert plan["linear_sigmas"] and plan["mu"] is not None


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"pass": "prune"}, "prune: no pruning rules for the {} family"),
        ({"pass": "layer_removal", "config": {"fraction": 0.25}}, "layer_removal: not implemented for the {} family"),
        ({"pass": "cache"}, "feature caching does not support the '{}' family"),
    ],
)
def test_passes_without_rules_for_a_family_refuse_it_before_any_work(flow_folders, name, step, message):
    program = load_program(flow_folders[name])
    with pytest.raises(ConfigError, match=message.format(name)):
        plan_passes([step], frozenset({"fp32"}), program=program)
