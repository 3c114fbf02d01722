"""In-tree reference models trained on sklearn's digits: a DiT, a UNet and a classifier (single-file checkpoints),
and two text-to-image latent diffusion pipelines (diffusers folders) sharing a digits VAE;
and PushT diffusion policies trained on a scripted expert's demonstrations (LeRobot folders)."""

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED = {
    "dit": WEIGHTS / "dit-digits.safetensors",
    "unet": WEIGHTS / "unet-digits.safetensors",
    "classifier": WEIGHTS / "classifier-digits.safetensors",
}
VAE = WEIGHTS / "vae-digits"  # diffusers AutoencoderKL folder
PIPELINES = {  # diffusers pipeline folders, each with prompts.txt and training.json
    "sd-digits": WEIGHTS / "sd-digits",
    "pixart-digits": WEIGHTS / "pixart-digits",
}
# zoo.policy's PushT policies: a LeRobot diffusion-policy folder and a transformer policy checkpoint.
POLICIES = {"unet": WEIGHTS / "pusht-unet", "transformer": WEIGHTS / "pusht-transformer.safetensors"}


def load_classifier():  # -> DigitsClassifier
    """The shipped digits classifier (eval mode), read from safetensors."""
    from safetensors.torch import load_file

    from zoo.models import DigitsClassifier

    model = DigitsClassifier()
    model.load_state_dict(load_file(str(SHIPPED["classifier"])))
    return model.eval().requires_grad_(False)
