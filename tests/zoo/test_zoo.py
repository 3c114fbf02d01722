"""Item 1: the shipped models are trained, reproducible from a seeded script, and good enough to judge with."""

import json

import pytest
import torch
from safetensors.torch import load_file

from calibration.capture import evaluation_set
from core.adapters import torch_denoise
from core.variants import sample_program
from verify.judges.digits import DigitsModel
from zoo import SHIPPED, load_classifier
from zoo.data import load_digits16, split
from zoo.train import train_classifier, train_denoiser


def test_training_is_seeded(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_denoiser("dit", a, steps=3, batch_size=8, seed=5)
    train_denoiser("dit", b, steps=3, batch_size=8, seed=5)
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = json.loads(a.with_suffix(".json").read_text())
    assert meta["training"]["command"].startswith("python -m zoo train dit")


def test_classifier_script_learns_and_reports_its_held_out_accuracy(tmp_path):
    """Six epochs (the shipped classifier trains 60): well above chance (0.1), and the accuracy it records
    is what its saved weights score on the held-out split."""
    from zoo.models import DigitsClassifier

    meta = train_classifier(tmp_path / "c.safetensors", epochs=6)
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(tmp_path / "c.safetensors")))
    images, labels = load_digits16()
    _, held_out = split(len(images), holdout=0.2, seed=0)
    with torch.no_grad():
        accuracy = (model.eval()(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert meta["training"]["heldout_accuracy"] == pytest.approx(accuracy) and accuracy > 0.3


def test_shipped_classifier_is_accurate_on_held_out_digits():
    images, labels = load_digits16()
    _, held_out = split(len(images), holdout=0.2, seed=0)
    with torch.no_grad():
        accuracy = (load_classifier()(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert accuracy >= 0.95


# Measured with the shipped plan (DDIM, 20 steps, guidance 2) on these 50 seeds: DiT 0.94, UNet 0.98 (chance 0.1).
@pytest.mark.parametrize("which,bar", [("dit", 0.9), ("unet", 0.9)])
def test_shipped_denoisers_draw_the_requested_digit(request, which, bar):
    program = request.getfixturevalue(f"{which}_program")
    seeds, classes = evaluation_set(program, 50, base_seed=123)
    x = sample_program(program, seeds, classes, torch_denoise(program))
    agreement, _, _ = DigitsModel().judge(x, classes)
    assert agreement >= bar
    meta = json.loads(SHIPPED[which].with_suffix(".json").read_text())
    assert meta["training"]["steps"] >= 1000 and "command" in meta["training"]
