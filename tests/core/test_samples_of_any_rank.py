"""Issue 34, item 2: a 1-D sample (an action chunk, horizon x action_dim) and observation conditioning
round-trip through calibration files, plan.json and the runner. The toy policy (tests/toy_policy.py)
registers from its one file; random weights prove mechanics, never fidelity."""

import json
import shutil

import pytest
import torch
from helpers import lower
from toy_policy import ADAPTER, STATE, ChunkNet, min_max

from backends.plan import read_plan
from backends.registry import open_runner
from calibration.capture import OBS_PREFIX, capture_calibration, load, save
from core.adapters import register
from core.conditions import encode
from core.errors import ConfigError, LoadError
from core.ir import Conditioning, ConditionInput, Normalization, Stages
from core.loading import program_from_model
from core.variants import sample_program

SAMPLING = {"scheduler": "ddim", "num_inference_steps": 6, "guidance_scale": 1.0}


def observation_set(rows: int = 3) -> dict[str, torch.Tensor]:
    """Raw observations in the units an environment reports (positions in [0, 512], an angle)."""
    g = torch.Generator().manual_seed(7)
    xy = torch.rand(rows, 2, 2, generator=g) * 512
    angle = torch.rand(rows, 2, 1, generator=g) * 6.4 - 3.2
    return {STATE: torch.cat([xy, angle], dim=2)}


@pytest.fixture(scope="module")
def policy():
    register(ADAPTER)
    torch.manual_seed(0)
    program = program_from_model(ChunkNet(), sampling=SAMPLING)
    return program.replace(stages=Stages(observations=observation_set()))


def test_the_spec_names_the_axes_and_the_observation_inputs(policy):
    spec = policy.spec
    assert spec.sample_shape == (8, 2) and spec.sample_axes == ("horizon", "action_dim") and not spec.image_like
    assert spec.conditioning.kind == "observation" and spec.conditioning.input_names == (STATE,)
    assert not spec.conditioning.supports_guidance
    assert spec.output_normalization == min_max([0.0, 0.0], [512.0, 512.0])


def test_observations_are_normalized_as_their_input_says():
    norm = min_max([0.0, -2.0], [10.0, 2.0])  # center (5, 0), spread (5, 2)
    x = torch.tensor([[0.0, -2.0], [10.0, 2.0], [5.0, 1.0]])
    torch.testing.assert_close(norm.normalize(x), torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.5]]))
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)
    with pytest.raises(ConfigError, match="spreads finite and > 0"):
        Normalization((0.0,), (0.0,))
    with pytest.raises(ConfigError, match="cannot apply to shape"):
        ConditionInput("state", (2, 3), "float32", norm)  # 2 features for a last axis of 3


def test_a_calibration_file_stores_the_observations_as_tensors_and_reads_them_back(policy, tmp_path):
    traj = capture_calibration(policy, 4)
    assert traj.x.shape == (6, 4, 8, 2) and traj.final.shape == (4, 8, 2)
    raw = observation_set()[STATE]
    assert all(torch.equal(c[STATE], raw[i % 3]) for i, c in enumerate(traj.conditions))
    # what the denoiser was fed: the raw rows normalized to [-1, 1]
    torch.testing.assert_close(
        traj.cond[STATE], (raw[[0, 1, 2, 0]] - torch.tensor([256.0, 256.0, 0.0])) / torch.tensor([256.0, 256.0, 3.2])
    )
    path = tmp_path / "calibration.safetensors"
    save(traj, path)
    back = load(path, policy)
    assert torch.equal(back.x, traj.x) and torch.equal(back.final, traj.final) and back.seeds == traj.seeds
    assert all(torch.equal(a[STATE], b[STATE]) for a, b in zip(back.conditions, traj.conditions, strict=True))


def test_a_calibration_file_whose_raw_and_normalized_observations_disagree_is_refused(policy, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "calibration.safetensors"
    save(capture_calibration(policy, 2), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[OBS_PREFIX + STATE] = tensors[OBS_PREFIX + STATE] + 1.0
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(LoadError, match="normalized observations differ"):
        load(path, policy)


@pytest.fixture(scope="module")
def lowered(policy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    lower(policy, folder)
    return folder


def test_plan_json_and_the_runner_carry_the_rank_the_axes_and_the_observations(policy, lowered):
    tmp_path = lowered
    plan = read_plan(tmp_path)
    assert plan.sample_shape == (8, 2) and plan.sample_axes == ("horizon", "action_dim")
    assert plan.conditioning == policy.spec.conditioning  # the observation input with its normalization
    assert plan.output_normalization == policy.spec.output_normalization
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["output"]["space"] == "normalized" and doc["graphs"]["denoiser"]["inputs"][:3] == [
        "sample",
        "timestep",
        STATE,
    ]
    seeds, conditions = [0, 1, 2], [{STATE: observation_set()[STATE][i]} for i in range(3)]
    reference = sample_program(policy, seeds, conditions)
    runner = open_runner(tmp_path)
    final = runner.sample(seeds, conditions)
    assert final.shape == (3, 8, 2)
    torch.testing.assert_close(final, reference, rtol=1e-4, atol=1e-4)
    actions = runner.decode(final)  # the output stage: actions back in the environment's units
    torch.testing.assert_close(actions, final * 256.0 + 256.0)
    with pytest.raises(ConfigError, match="must be float32 of shape"):
        runner.sample([0], [{STATE: torch.zeros(3, 3)}])
    with pytest.raises(ConfigError, match="one observation per seed"):
        runner.sample([0, 1], conditions[:1])


def test_a_plan_whose_axes_do_not_fit_its_shape_is_refused(lowered, tmp_path):
    shutil.copytree(lowered, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "plan.json"
    doc = json.loads(path.read_text())
    doc["sample_axes"] = ["horizon"]
    path.write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="must name each of the 2 axes once"):
        read_plan(tmp_path)


def test_observation_conditioning_reads_back_from_its_dict_and_refuses_mixtures(policy):
    conditioning = policy.spec.conditioning
    assert Conditioning.from_dict(json.loads(json.dumps(conditioning.to_dict()))) == conditioning
    mixed = {**json.loads(json.dumps(conditioning.to_dict())), "num_classes": 10}
    with pytest.raises(ConfigError, match="not two of them"):
        Conditioning.from_dict(mixed)
    with pytest.raises(ConfigError, match="needs exactly the tensors"):
        encode(policy, [{"observation.image": torch.zeros(2, 3)}], 1)


def test_int8_quantizes_a_policys_conv1d_layers_and_ort_runs_the_qdq_graph(policy, tmp_path):
    """The family lists Conv1d among its quantizable types: those layers become quantized layers (per output
    channel over a 1-D kernel) and lower to a Q/DQ graph ONNX Runtime runs like the emulation."""
    from helpers import run_recipe
    from torch import nn

    from core.adapters import torch_denoise
    from core.quantized import quantized_layers

    calibration = capture_calibration(policy, 4)
    recipe = [{"pass": "quantize", "config": {"activations": "int8", "calibration_inputs": 32}}]
    quantized = run_recipe(policy, calibration, recipe, frozenset({"fp32", "int8"}))
    layers = quantized_layers(quantized.denoiser)
    assert {"conv_in", "conv_mid", "conv_out"} <= set(layers)
    assert all(isinstance(layers[n].inner, nn.Conv1d) for n in ("conv_in", "conv_mid", "conv_out"))
    lower(quantized, tmp_path)
    x, t = calibration.x[3], calibration.t[3].expand(4)
    cond = {STATE: calibration.cond[STATE]}
    emulated = torch_denoise(quantized)(x, t, cond)
    lowered = open_runner(tmp_path).denoise(x, t, cond)
    assert float((lowered - emulated).norm() / emulated.norm()) < 0.02
