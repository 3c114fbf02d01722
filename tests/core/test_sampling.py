"""Item 3: our loop reproduces diffusers' own pipelines for the same model, seeds and scheduler."""

import dataclasses

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DiTPipeline
from helpers import IdentityVAE, tiny_dit, tiny_unet

from core.adapters import torch_denoise
from core.errors import ConfigError
from core.loading import program_from_model
from core.pixels import to_images
from core.sampling import initial_noise
from core.schedulers import with_scheduler
from core.variants import sample_program
from verify.metrics import psnr

SEEDS = [0, 1, 2]


def ours(program, seeds=SEEDS, labels=None):
    return to_images(sample_program(program, seeds, labels, torch_denoise(program)))


def dit_pipeline_samples(program, labels):
    """diffusers' DiTPipeline run with the program's scheduler, steps and guidance."""
    plan = program.plan
    scheduler = getattr(diffusers, plan.scheduler_class).from_config(plan.scheduler_config)
    pipe = DiTPipeline(transformer=program.denoiser, vae=IdentityVAE(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(
        class_labels=labels,
        guidance_scale=plan.guidance_scale,
        num_inference_steps=plan.num_inference_steps,
        output_type="pt",
        generator=generators,
    ).images


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_trained_dit_matches_diffusers_dit_pipeline(dit_program, scheduler):
    # DiTPipeline hard-codes the ImageNet null class (1000), so with 10 classes it runs without guidance.
    program = dit_program.replace(
        plan=dataclasses.replace(
            with_scheduler(dit_program.plan, scheduler), guidance_scale=1.0, num_inference_steps=10
        )
    )
    labels = [3, 7, 1]
    expected = dit_pipeline_samples(program, labels)
    torch.testing.assert_close(ours(program, labels=labels), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_guided_sampling_matches_dit_pipeline(scheduler):
    # Guidance needs the pipeline's null class 1000: a 1000-class DiT (random weights: equivalence only).
    program = program_from_model(
        tiny_dit(1000), sampling={"scheduler": scheduler, "num_inference_steps": 8, "guidance_scale": 3.0}
    )
    assert program.spec.conditioning.null_class == 1000
    labels = [5, 999, 42]
    expected = dit_pipeline_samples(program, labels)
    torch.testing.assert_close(ours(program, labels=labels), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pipeline_cls,scheduler", [(DDPMPipeline, "ddpm"), (DDIMPipeline, "ddim")])
def test_unconditional_unet_matches_diffusers_pipelines(pipeline_cls, scheduler):
    # DDPM adds noise at every step: this also checks per-sample generators are used like diffusers does.
    program = program_from_model(tiny_unet(), sampling={"scheduler": scheduler, "num_inference_steps": 6})
    plan = program.plan
    pipe = pipeline_cls(
        unet=program.denoiser, scheduler=getattr(diffusers, plan.scheduler_class).from_config(plan.scheduler_config)
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        batch_size=len(SEEDS),
        num_inference_steps=6,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images
    got = ours(program).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_a_sample_depends_on_its_seed_only(dit_program):
    program = dit_program.replace(plan=dataclasses.replace(dit_program.plan, num_inference_steps=5))
    alone = ours(program, seeds=[7], labels=[4])
    batched = ours(program, seeds=[3, 7], labels=[1, 4])
    # Batched kernels may sum in another order: equal up to float round-off, not bit for bit.
    assert psnr(batched[1:], alone).min() >= 60
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 1)]
    assert initial_noise((1, 4, 4), gens[2:]).equal(initial_noise((1, 4, 4), gens[:2])[1:])


def test_bad_sampling_requests_are_refused(dit_program):
    denoise = torch_denoise(dit_program)
    with pytest.raises(ConfigError, match="one label per seed"):
        sample_program(dit_program, [0, 1], [1], denoise)
    with pytest.raises(ConfigError, match="class labels must lie"):
        sample_program(dit_program, [0], [10], denoise)
    with pytest.raises(ConfigError, match="unknown scheduler"):
        with_scheduler(dit_program.plan, "warp-drive")
