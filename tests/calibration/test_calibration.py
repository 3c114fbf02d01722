"""Item 4: calibration capture records every step's denoiser inputs and outputs, and is reusable."""

import dataclasses

import pytest
import torch

from calibration.capture import capture, load, save
from core.adapters import torch_denoise
from core.errors import ConfigError
from core.sampling import initial_noise


@pytest.fixture(scope="module")
def trajectories(dit_program):
    return capture(dit_program, seeds=[11, 12, 13], conditions=[0, 4, 9])


def test_every_step_is_recorded(dit_program, trajectories):
    steps = dit_program.plan.num_inference_steps
    assert trajectories.x.shape == (steps, 6, 1, 16, 16)  # guided: [cond; uncond] batch
    assert trajectories.t.shape == (steps,) and trajectories.t[0] > trajectories.t[-1]
    assert trajectories.cond["class_labels"].tolist() == [0, 4, 9, 10, 10, 10]
    noise = initial_noise((1, 16, 16), [torch.Generator().manual_seed(s) for s in (11, 12, 13)])
    torch.testing.assert_close(trajectories.x[0, :3], noise)


def test_recorded_outputs_are_the_denoisers(dit_program, trajectories):
    s = 7
    out = torch_denoise(dit_program)(trajectories.x[s], trajectories.t[s].expand(6), trajectories.cond)
    torch.testing.assert_close(out, trajectories.output[s], rtol=0, atol=1e-6)


def test_round_trip_and_fingerprint_check(tmp_path, dit_program, trajectories):
    path = tmp_path / "calibration.safetensors"
    save(trajectories, path)
    again = load(path, dit_program)
    assert again.seeds == (11, 12, 13) and again.conditions == (0, 4, 9)
    assert torch.equal(again.x, trajectories.x) and torch.equal(again.output, trajectories.output)
    other = dit_program.replace(plan=dataclasses.replace(dit_program.plan, num_inference_steps=7))
    with pytest.raises(ConfigError, match="different model or sampling plan"):
        load(path, other)
