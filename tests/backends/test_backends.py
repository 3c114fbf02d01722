"""Item 6: ONNX lowering, ONNX Runtime execution, plan.json and the runner that executes it."""

import json

import onnx
import pytest
import torch
from helpers import lower
from onnx import TensorProto, helper

from backends.onnx_export import check_graph, export_onnx
from backends.plan import read_plan
from backends.registry import open_runner
from core.adapters import denoiser_module, torch_denoise
from core.errors import ExportError, LoadError
from core.sampling import to_images
from core.variants import sample_program
from verify.metrics import psnr


@pytest.fixture(scope="module", params=["dit", "unet"])
def lowered(request, tmp_path_factory):
    program = request.getfixturevalue(f"{request.param}_program")
    folder = tmp_path_factory.mktemp(request.param)
    lower(program, folder)
    return program, folder


def test_graph_is_opset_18_with_dynamic_batch_and_no_random_ops(lowered):
    _, folder = lowered
    model = onnx.load(str(folder / "denoiser.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "class_labels"]
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # symbolic batch
    check_graph(model)


def test_ort_matches_torch_per_call(lowered):
    program, folder = lowered
    runner = open_runner(folder)
    torch.manual_seed(0)
    x = torch.randn(5, 1, 16, 16)
    t = torch.tensor([999.0, 700.0, 400.0, 50.0, 1.0])
    y = {"class_labels": torch.tensor([0, 3, 6, 9, 10])}
    torch.testing.assert_close(runner.denoise(x, t, y), torch_denoise(program)(x, t, y), rtol=1e-4, atol=1e-5)


def test_runner_reproduces_the_torch_sampler(lowered):
    program, folder = lowered
    seeds, labels = list(range(10)), list(range(10))
    reference = sample_program(program, seeds, labels, torch_denoise(program))
    candidate = open_runner(folder).sample(seeds, labels)
    assert psnr(to_images(reference), to_images(candidate)).min() >= 60.0


def test_plan_file_describes_the_loop(lowered):
    program, folder = lowered
    doc = json.loads((folder / "plan.json").read_text())
    assert doc["sampling"]["num_inference_steps"] == len(doc["timesteps"]) == len(doc["steps"])
    assert doc["guidance"]["enabled"] and doc["guidance"]["scale"] == program.plan.guidance_scale
    assert doc["graphs"]["denoiser"]["file"] == "denoiser.onnx"
    assert doc["conditioning"] == {"num_classes": 10, "null_class": 10, "text": []}
    assert "Infinity" not in (folder / "plan.json").read_text()  # strict JSON
    assert read_plan(folder).sampling == program.plan


def test_plan_errors(tmp_path, lowered):
    with pytest.raises(LoadError, match=r"no plan\.json"):
        read_plan(tmp_path)
    _, folder = lowered
    doc = json.loads((folder / "plan.json").read_text())
    doc["graphs"]["denoiser"]["file"] = "missing.onnx"
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="missing"):
        read_plan(tmp_path)


def test_random_ops_are_rejected():
    node = helper.make_node("RandomNormalLike", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match="random ops"):
        check_graph(model)


def test_export_switches_the_module_to_eval_mode(tmp_path, dit_program):
    module = denoiser_module(dit_program)
    module.train()  # export must switch to eval itself
    export_onnx(module, dit_program.spec, tmp_path / "d.onnx")
    assert not module.training


def test_old_opset_is_refused(tmp_path, dit_program):
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(denoiser_module(dit_program), dit_program.spec, tmp_path / "d.onnx", opset=17)
