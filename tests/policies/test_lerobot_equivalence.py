"""A LeRobot diffusion-policy folder acts under us as under LeRobot's own DiffusionPolicy.select_action
(lerobot 0.3.2, run in .venv-lerobot, made by `.ci/lerobot-env`: lerobot does not import beside this project's
torch; see the README): the same observations and noise give the same executed actions, for DDIM and DDPM
(whose every step draws noise), on the first decision of an episode (the observation queue filled with
copies) and on a later one. Folders in the layout lerobot 0.3.2 reads (the stats inside the weights); random
weights (no fidelity claim). LeRobot's image encoder (ResNet-18 + spatial soft-argmax), written here because
torchvision does not import beside our torch, gives LeRobot's features from LeRobot's weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot_layout import QUICK, save

from core.environments import pusht
from core.loading import load_program
from core.variants import sample_program

SIDE = Path(__file__).resolve().parents[2] / ".venv-lerobot" / "bin" / "python"

PEER = """
import json, sys, types
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import numpy as np, torch
from safetensors.torch import save_file
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy, DiffusionRgbEncoder
work = sys.argv[1]
observations, seeds = np.load(f"{work}/obs.npz"), json.loads(sys.argv[2])
state, env = torch.from_numpy(observations["state"]), torch.from_numpy(observations["env"])
found = {}
for folder in sys.argv[3:]:
    policy = DiffusionPolicy.from_pretrained(folder).eval()
    executed = []
    for decision, seed in enumerate(seeds):  # select_action once per control step, as a rollout calls it
        steps = range(decision * policy.config.n_action_steps, (decision + 1) * policy.config.n_action_steps)
        torch.manual_seed(seed)  # the chunk is sampled on the decision's first call
        for t in steps:
            batch = {"observation.state": state[t : t + 1], "observation.environment_state": env[t : t + 1]}
            executed.append(policy.select_action(batch)[0].tolist())
    found[folder] = executed
print(json.dumps(found))
# The image encoder, GroupNorm and BatchNorm variants: its weights and its features of the saved images.
encoded = {}
for group_norm in (True, False):
    torch.manual_seed(0)
    image = PolicyFeature(type=FeatureType.VISUAL, shape=(3, 96, 96))
    state_feature = PolicyFeature(type=FeatureType.STATE, shape=(2,))
    config = DiffusionConfig(
        input_features={"observation.image": image, "observation.state": state_feature},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        use_group_norm=group_norm,
    )
    encoder = DiffusionRgbEncoder(config).eval()
    for m in encoder.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        encoded[f"{group_norm}.features"] = encoder(torch.from_numpy(np.load(f"{work}/images.npy")))
    encoded.update({f"{group_norm}.{k}": v.contiguous() for k, v in encoder.state_dict().items()})
save_file(encoded, f"{work}/encoder.safetensors")
"""
SEEDS = [11, 12]  # two decisions


@pytest.fixture(scope="module")
def lerobot(tmp_path_factory):
    """LeRobot's actions for two policy folders (DDIM, DDPM) and its image encoder's weights and features, from
    one run of the side environment (lerobot imports slowly)."""
    if not SIDE.exists():
        pytest.skip("no .venv-lerobot (make it with .ci/lerobot-env; .ci/run does)")
    work = tmp_path_factory.mktemp("lerobot")
    folders = {}
    for scheduler, steps in (("DDIM", 4), ("DDPM", 20)):
        config = dict(QUICK, noise_scheduler_type=scheduler, num_inference_steps=steps)
        folders[scheduler] = save(work / scheduler, old=True, scheduler=config)
    rng = np.random.default_rng(0)
    n_action = load_program(folders["DDIM"]).spec.chunking.n_action_steps
    observations = {"state": rng.uniform(0, 512, (2 * n_action, 2)), "env": rng.uniform(0, 512, (2 * n_action, 16))}
    observations = {k: v.astype(np.float32) for k, v in observations.items()}
    np.savez(work / "obs.npz", **observations)
    images = rng.uniform(0, 1, (3, 3, 96, 96)).astype(np.float32)
    np.save(work / "images.npy", images)
    peer = subprocess.run(
        [str(SIDE), "-c", PEER, str(work), json.dumps(SEEDS), *map(str, folders.values())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert peer.returncode == 0, peer.stderr[-2000:]
    actions = json.loads(peer.stdout.strip().splitlines()[-1])
    return folders, observations, actions, images, work / "encoder.safetensors"


def test_our_actions_equal_lerobots_select_action(lerobot):
    folders, observations, theirs, _, _ = lerobot
    for folder in folders.values():
        program = load_program(folder)
        chunking = program.spec.chunking
        ours = []
        for decision, seed in enumerate(SEEDS):
            t = decision * chunking.n_action_steps  # the queue: the previous observation and this one
            history = [max(t - 1, 0), t]
            row = {
                pusht.STATE: torch.from_numpy(observations["state"][history]),
                pusht.ENV_STATE: torch.from_numpy(observations["env"][history]),
            }
            chunk = program.spec.output_normalization.denormalize(sample_program(program, [seed], [row]))[0]
            ours.append(chunk[chunking.first : chunking.first + chunking.n_action_steps])
        torch.testing.assert_close(torch.cat(ours), torch.tensor(theirs[str(folder)]), rtol=1e-4, atol=1e-3)


def test_our_image_encoder_gives_lerobots_features_from_lerobots_weights(lerobot):
    from safetensors.torch import load_file

    from core.networks.lerobot_rgb import RgbEncoder

    _, _, _, images, encoder_file = lerobot
    theirs = load_file(str(encoder_file))
    for group_norm in (True, False):
        prefix = f"{group_norm}."
        state = {k.removeprefix(prefix): v for k, v in theirs.items() if k.startswith(prefix)}
        want = state.pop("features")
        ours = RgbEncoder((3, 96, 96), (84, 84), "resnet18", group_norm, 32).eval()
        ours.load_state_dict(state, strict=True)  # LeRobot's names, every one
        with torch.no_grad():
            got = ours(torch.from_numpy(images))
        assert got.shape == (3, 64) and want.abs().max() > 0.1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
