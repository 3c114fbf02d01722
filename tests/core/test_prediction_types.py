"""Issue 34: the prediction convention is read from the scheduler config and checked: an unknown one is
refused at load (one line), never treated as epsilon; UniPC's `flow_prediction` is flow."""

import dataclasses

import pytest
import torch
from helpers import tiny_dit

from core.errors import ConfigError, LoadError
from core.loading import program_from_model
from core.noising import training_target

DDIM = {"scheduler": "ddim", "num_inference_steps": 4}
UNIPC = {"scheduler": "UniPCMultistepScheduler", "num_inference_steps": 4}


def test_an_unknown_prediction_type_is_refused_and_flow_prediction_is_flow():
    model = tiny_dit(10)
    weird = {"class": "DDIMScheduler", "config": {"prediction_type": "x_prediction"}}
    with pytest.raises(LoadError, match="prediction_type given as x_prediction"):  # the scheduler's own check
        program_from_model(model, scheduler=weird, sampling=DDIM)
    spec = program_from_model(model, sampling=DDIM).spec
    with pytest.raises(ConfigError, match="prediction type 'x_prediction' is not one of epsilon, v_prediction"):
        dataclasses.replace(spec, prediction_type="x_prediction")  # ours, whatever a scheduler lets through
    unipc = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
    flow = {"class": "UniPCMultistepScheduler", "config": unipc}
    assert program_from_model(model, scheduler=flow, sampling=UNIPC).spec.prediction_type == "flow"
    x0, noise = torch.ones(1, 2), torch.zeros(1, 2)
    assert torch.equal(training_target(None, "flow", x0, noise, torch.zeros(1)), noise - x0)
    with pytest.raises(ValueError, match="no training target for prediction type 'x_prediction'"):
        training_target(None, "x_prediction", x0, noise, torch.zeros(1))
