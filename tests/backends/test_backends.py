"""Item 6: ONNX lowering, ONNX Runtime execution, plan.json and the runner that executes it."""

import json
import math
from pathlib import Path

import onnx
import pytest
import torch
from helpers import lower
from onnx import TensorProto, helper

from backends.onnx_export import STACK_TRACE, check_graph, export_onnx
from backends.plan import read_plan
from backends.registry import open_runner
from core.adapters import denoiser_module, torch_denoise
from core.errors import ExportError, LoadError
from core.pixels import to_images
from core.variants import sample_program
from verify.metrics import psnr

ROOT = Path(__file__).resolve().parents[2]  # the checkout the graphs are exported from


@pytest.fixture(scope="module", params=["tiny_digits", "unet"])  # a DiT (tiny, quick to export) and a UNet
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
    # No trace of the machine that exported it: the exporter's stack traces (absolute source paths) are dropped.
    values = [p.value for node in model.graph.node for p in node.metadata_props]
    assert values and not any(str(ROOT) in v or "site-packages" in v for v in values)
    assert not any(p.key == STACK_TRACE for node in model.graph.node for p in node.metadata_props)


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
    assert doc["conditioning"] == {"num_classes": 10, "null_class": 10, "text": [], "embedded_guidance": None}
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


def test_export_switches_the_module_to_eval_mode(tmp_path, tiny_digits_program):
    module = denoiser_module(tiny_digits_program)
    module.train()  # export must switch to eval itself
    export_onnx(module, tiny_digits_program.spec, tmp_path / "d.onnx")
    assert not module.training


def test_old_opset_is_refused(tmp_path, dit_program):
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(denoiser_module(dit_program), dit_program.spec, tmp_path / "d.onnx", opset=17)


def test_weights_over_the_inline_limit_go_to_a_recorded_data_file(tiny_digits_program, tmp_path, monkeypatch):
    """Graphs over 2 GiB (DiT-XL, SD's UNet in fp32) cannot be one protobuf: their weights go to
    `<graph>.data`, recorded in plan.json with its own sha256; nothing else may hold external data."""
    import backends.onnx_export as export
    from backends.plan import sha256

    monkeypatch.setattr(export, "INLINE_LIMIT", 0)  # every graph "large"
    folder = tmp_path / "a"
    folder.mkdir()
    lower(tiny_digits_program, folder)
    doc = json.loads((folder / "plan.json").read_text())
    entry = doc["graphs"]["denoiser"]
    weights = (folder / "denoiser.onnx.data").stat().st_size
    assert (
        entry["data"]["file"] == "denoiser.onnx.data"
        and weights > 4 * sum(p.numel() for p in tiny_digits_program.denoiser.parameters()) * 0.9
    )
    graph = onnx.load(str(folder / "denoiser.onnx"), load_external_data=False).graph
    big = [t for t in graph.initializer if 4 * math.prod(t.dims) >= 1024]  # onnx keeps smaller ones inline
    assert big and all(t.data_location == TensorProto.EXTERNAL for t in big)
    seeds, labels = [0, 1], [3, 4]
    reference = sample_program(tiny_digits_program, seeds, labels, torch_denoise(tiny_digits_program))
    assert psnr(to_images(reference), to_images(open_runner(folder).sample(seeds, labels))).min() >= 60.0

    data = folder / "denoiser.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")  # tampered weights
    with pytest.raises(LoadError, match="does not match its recorded sha256"):
        read_plan(folder)
    entry["data"]["sha256"] = sha256(data)
    del entry["data"]  # a graph with external data that plan.json does not record
    (folder / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="refers to external data"):
        read_plan(folder)


@pytest.mark.parametrize("dynamo", [True, False])
def test_1d_convolutions_are_written_as_2d_with_the_same_outputs(tmp_path, dynamo):
    # ORT's CPU Conv is faster on 2-D convolutions (backends.onnx_export.conv1d_as_conv2d); every 1-D setting
    # (stride, padding, dilation, groups, no bias) must map onto the 2-D form exactly.
    import onnxruntime as ort

    from backends.onnx_export import export_graph

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(4, 8, 5, padding=2),
        torch.nn.Mish(),
        torch.nn.Conv1d(8, 8, 3, stride=2, padding=1, dilation=1, groups=2, bias=False),
        torch.nn.Conv1d(8, 6, 3, padding=2, dilation=2),
        torch.nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1),
    )
    x = torch.randn(3, 4, 16)
    path = export_graph(net, (x,), ["x"], ["y"], tmp_path / "net.onnx", dynamo=dynamo)
    model = onnx.load(str(path))
    weights = {i.name: len(i.dims) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and all(weights[n.input[1]] == 4 for n in convs)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = net(x).numpy()
    assert got.shape == want.shape and float(abs(got - want).max()) < 1e-5


def test_a_conv_weight_that_is_also_a_graph_input_stays_1d():
    import numpy as np

    from backends.onnx_export import conv1d_as_conv2d

    w = onnx.numpy_helper.from_array(np.ones((6, 4, 3), np.float32), "W")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [1, 4, 8]), ("W", [6, 4, 3]))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3])],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 6])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    conv1d_as_conv2d(model)
    assert [n.op_type for n in model.graph.node] == ["Conv"] and list(model.graph.initializer[0].dims) == [6, 4, 3]
