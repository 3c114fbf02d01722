"""Text-conditioned latent pipelines (SD-style UNet, PixArt): loading from a diffusers pipeline folder,
the loop against diffusers' own pipelines, the lowered stages, and bad input. Tiny random weights:
mechanics and equivalence only (fidelity is tested on the trained zoo pipelines)."""

import dataclasses

import pytest
import torch
from helpers import lower

from backends.registry import open_runner
from core.errors import ConfigError, LoadError
from core.loading import load_program
from core.pixels import to_images
from core.stages import decode, read_prompts
from core.variants import sample_program
from verify.metrics import psnr

PROMPTS = ["a thick seven", "a thin one", "a thick seven"]
EXTRA = {"sd": {}, "pixart": {"use_resolution_binning": False, "max_sequence_length": 16}}


@pytest.fixture(scope="module")
def folders(text_folders):
    return text_folders


def short(program, steps=5):
    return program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=steps))


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_pipeline_folder_loads_every_stage(folders, family):
    program = load_program(folders[family])
    stages, conditioning = program.stages, program.spec.conditioning
    assert program.spec.family == {"sd": "sd-unet", "pixart": "pixart"}[family]
    assert len(stages.text_encoders) == 1 and stages.vae is not None and stages.vae_scale == 2
    assert stages.prompts == ("a thick seven", "a thin one", "a digit")  # comments and blank lines skipped
    assert conditioning.kind == "text" and conditioning.inputs[0].shape == (16, 32)
    names = {"sd": ("encoder_hidden_states",), "pixart": ("encoder_hidden_states", "encoder_attention_mask")}
    assert conditioning.input_names == names[family]
    # The pipeline's own scheduler is kept, with its pipeline's default steps and guidance.
    assert program.plan.scheduler_class == "DDIMScheduler"
    assert (program.plan.num_inference_steps, program.plan.guidance_scale) == {"sd": (50, 7.5), "pixart": (20, 4.5)}[
        family
    ]


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_loop_reproduces_the_diffusers_pipeline(folders, family):
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline

    program = short(load_program(folders[family]))
    pipe = {"sd": StableDiffusionPipeline, "pixart": PixArtAlphaPipeline}[family].from_pretrained(folders[family])
    pipe.set_progress_bar_config(disable=True)

    def theirs(output_type):
        generators = [torch.Generator().manual_seed(s) for s in range(3)]
        plan = program.plan
        kwargs = dict(num_inference_steps=plan.num_inference_steps, guidance_scale=plan.guidance_scale)
        return pipe(prompt=PROMPTS, generator=generators, output_type=output_type, **kwargs, **EXTRA[family]).images

    # Equal up to float round-off: diffusers batches [uncond, cond], we batch [cond, uncond].
    latents = sample_program(program, [0, 1, 2], PROMPTS)
    torch.testing.assert_close(latents, theirs("latent"), rtol=1e-5, atol=1e-4)
    images = to_images(decode(program.stages, latents))
    torch.testing.assert_close(images, theirs("pt"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["pixart"])  # SD's stages: tests/optimizer/test_text_cli.py lowers them
def test_lowered_stages_match_torch(folders, family, tmp_path):
    program = short(load_program(folders[family]))
    written = lower(program, tmp_path)
    assert written["stages"] == ["prompt_encoder.onnx", "decoder.onnx"]
    runner = open_runner(tmp_path)
    candidate = runner.decode(runner.sample([0, 1, 2], PROMPTS))
    reference = decode(program.stages, sample_program(program, [0, 1, 2], PROMPTS))
    assert psnr(to_images(reference), to_images(candidate)).min() >= 60.0


def test_each_prompt_is_encoded_once(folders):
    program = short(load_program(folders["sd"]), steps=2)
    calls = []
    encoder = program.stages.text_encoders[0]
    handle = encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        sample_program(program, [0, 1, 2], PROMPTS)
        sample_program(program, [3], ["a thin one"])
    finally:
        handle.remove()
    assert calls == [3]  # "a thick seven", "a thin one" and the empty prompt, once each


def test_bad_prompts_and_folders_are_refused(folders, tmp_path):
    program = load_program(folders["sd"])
    from core.prompts import text_adapter

    with pytest.raises(ConfigError, match=r"prompt 1 .* tokens; text encoder 1 takes at most 16"):
        text_adapter(program).tokenize(program.stages, ["a thick seven " * 8])
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="no such prompts file"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="one prompt per seed"):
        sample_program(program, [0, 1], ["a thin one"])
    broken = tmp_path / "no-denoiser"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(LoadError, match="names no 'transformer' or 'unet'"):
        load_program(broken)


def test_sdxl_mechanics_match_the_diffusers_pipeline_and_ort(tmp_path):
    """SDXL's two encoders, pooled embedding, size ids and zeroed unconditional branch (tiny random)."""
    from diffusers import StableDiffusionXLPipeline
    from helpers import tiny_sdxl_pipeline

    folder = tiny_sdxl_pipeline(tmp_path)
    program = short(load_program(folder), steps=4)
    assert program.spec.conditioning.input_names == ("encoder_hidden_states", "text_embeds", "time_ids")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    plan = program.plan
    theirs = pipe(
        prompt=PROMPTS[:2],
        num_inference_steps=plan.num_inference_steps,
        guidance_scale=plan.guidance_scale,
        generator=[torch.Generator().manual_seed(s) for s in range(2)],
        output_type="latent",
    ).images
    ours = sample_program(program, [0, 1], PROMPTS[:2])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    lower(program, tmp_path / "out")
    runner = open_runner(tmp_path / "out")
    candidate = runner.decode(runner.sample([0, 1], PROMPTS[:2]))
    assert psnr(to_images(decode(program.stages, ours)), to_images(candidate)).min() >= 60.0
