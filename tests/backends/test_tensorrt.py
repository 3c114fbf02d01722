"""Issue 17: the TensorRT backend. On CPU: the lint of every lowered graph, and the fallback that verifies the
same graphs in ONNX Runtime and says so. Engine builds run only where TensorRT and a CUDA GPU are present."""

import numpy as np
import onnx
import pytest
import torch
from helpers import run_recipe
from onnx import TensorProto, helper, numpy_helper

from backends.registry import get_backend, open_runner
from backends.trt import unavailable
from backends.trt_lint import lint_model
from calibration import capture as calib
from calibration.capture import evaluation_set

INT8 = {"pass": "quantize", "config": {"weights": "int8", "activations": "int8", "calibration": "timestep"}}
U8S8 = {"pass": "quantize", "config": {"weights": "int8", "activations": "uint8", "calibration": "timestep"}}


def qdq_graph(zero_point_type, zero_point=0, consumer="DequantizeLinear", opset=18, extra=()):
    """x -> Q -> (DQ | consumer) -> MatMul with a DQ'd int8 weight -> y."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zp = helper.make_tensor("zp", zero_point_type, [], [zero_point])
    w = helper.make_tensor("w", TensorProto.INT8, [4, 4], [1] * 16)
    w_scale = numpy_helper.from_array(np.array(0.01, np.float32), "w_scale")
    w_zp = helper.make_tensor("w_zp", TensorProto.INT8, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["xq"], name="q"),
        helper.make_node(consumer, ["xq", "scale", "zp"] if consumer == "DequantizeLinear" else ["xq"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], name="dq_w"),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
        *extra,
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [scale, zp, w, w_scale, w_zp],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model):
    return {(f["rule"], f["severity"]) for f in lint_model(model)["findings"]}


def test_lint_rules_on_small_graphs():
    clean = lint_model(qdq_graph(TensorProto.INT8))
    assert clean["errors"] == clean["warnings"] == 0 and clean["dequantize_nodes"] == {"INT8": 2}
    assert rules(qdq_graph(TensorProto.FLOAT8E4M3FN)) == set()
    # ORT's fast CPU path (U8S8) is not TensorRT's: UINT8 activations with a non-zero zero point.
    assert rules(qdq_graph(TensorProto.UINT8, 128)) == {("qdq-type", "error"), ("qdq-zero-point", "error")}
    assert ("int4-activations", "error") in rules(qdq_graph(TensorProto.INT4, opset=21))
    assert ("opset", "warning") in rules(qdq_graph(TensorProto.INT4, opset=21))
    assert rules(qdq_graph(TensorProto.INT8, opset=8)) == {("opset", "error")}
    assert ("qdq-pair", "error") in rules(qdq_graph(TensorProto.INT8, consumer="Cast"))
    ms = helper.make_node("FusedMatMul", ["y", "y"], ["z"], domain="com.microsoft", name="fused")
    assert ("domain", "error") in rules(qdq_graph(TensorProto.INT8, extra=[ms]))
    unsupported = helper.make_node("MatMulInteger", ["xq", "w"], ["z"], name="mmi")
    found = lint_model(qdq_graph(TensorProto.INT8, extra=[unsupported]))["findings"]
    assert any(f["rule"] == "op" and f["node"] == "mmi" and "MatMulInteger" in f["message"] for f in found)
    lonely = qdq_graph(TensorProto.INT8)
    lonely.graph.node[1].input[0] = "x"  # an activation DQ with no Q before it
    assert ("qdq-pair", "error") in rules(lonely)


@pytest.fixture(scope="module")
def int8_program(tiny_digits_program):
    calibration = calib.capture(tiny_digits_program, *evaluation_set(tiny_digits_program, 2, 0))
    return run_recipe(tiny_digits_program, calibration, [INT8], frozenset({"fp32", "int8"})), calibration


def test_int8_graphs_lint_clean_and_without_tensorrt_run_in_ort_and_say_so(int8_program, tmp_path):
    if unavailable() is None:
        pytest.skip("TensorRT and a GPU are present: the engine test covers this machine")
    program, _ = int8_program
    backend = get_backend({"name": "tensorrt", "max_batch": 8})
    written = backend.lower(program, tmp_path)
    lint = written["tensorrt"]["lint"]["denoiser.onnx"]
    assert lint["errors"] == 0 and lint["dequantize_nodes"]["INT8"] > 10, lint["findings"][:3]
    assert written["tensorrt"]["engines"] == {"built": [], "reason": unavailable()}
    runner = open_runner(tmp_path)  # plan.json names the tensorrt backend
    described = runner.describe()
    assert described["name"] == "tensorrt" and described["executed_by"].startswith("onnxruntime")
    assert described["why_not_tensorrt"] == unavailable()
    ort = get_backend({"name": "onnxruntime"}).runner(tmp_path)
    torch.testing.assert_close(runner.sample([0, 1], [3, 5]), ort.sample([0, 1], [3, 5]), rtol=0, atol=0)


def test_u8s8_graphs_fail_the_lint(tiny_digits_program, int8_program, tmp_path):
    _, calibration = int8_program
    program = run_recipe(tiny_digits_program, calibration, [U8S8], frozenset({"fp32", "int8"}))
    lint = get_backend({"name": "tensorrt"}).lower(program, tmp_path)["tensorrt"]["lint"]["denoiser.onnx"]
    assert lint["errors"] > 0 and {f["rule"] for f in lint["findings"]} == {"qdq-type", "qdq-zero-point"}


@pytest.mark.skipif(unavailable() is not None, reason=f"needs TensorRT and a CUDA GPU: {unavailable()}")
def test_engines_build_and_match_onnx_runtime(int8_program, tmp_path):
    program, _ = int8_program
    written = get_backend({"name": "tensorrt", "max_batch": 8}).lower(program, tmp_path)
    assert written["tensorrt"]["engines"]["built"] == ["denoiser.plan"]
    assert (tmp_path / "tensorrt.timing-cache").is_file()
    runner = open_runner(tmp_path)
    assert runner.describe()["executed_by"] == "tensorrt"
    ort = get_backend({"name": "onnxruntime"}).runner(tmp_path)
    seeds, classes = [0, 1, 2], [3, 5, 7]
    engine, reference = runner.sample(seeds, classes), ort.sample(seeds, classes)
    assert (engine - reference).abs().max() < 0.05 * reference.abs().max()
    onnx.checker.check_model(str(tmp_path / "denoiser.onnx"))


def test_a_gpu_target_reports_the_lint_and_what_ran_instead(tmp_path, tiny_digits_dit):
    """a100-int8's backend and format on the tiny DiT (quantize only): the report's TensorRT section."""
    import json
    import shutil

    from click.testing import CliRunner

    from optimizer.cli import main
    from optimizer.targets import TARGETS_DIR

    target = json.loads((TARGETS_DIR / "a100-int8.json").read_text())
    assert target["backend"]["name"] == "tensorrt"
    target |= {"name": "a100-int8-quantize", "gates": {"min_psnr_db": 0.0}}
    (quantize,) = [step for step in target["recipe"] if step["pass"] == "quantize"]
    quantize["config"]["check_samples"] = 4  # the distribution check runs, on 4 samples (not the target's 200)
    target["recipe"] = [quantize]
    (tmp_path / "t.json").write_text(json.dumps(target))
    model = tmp_path / "model" / tiny_digits_dit.name
    model.parent.mkdir()
    for src in (tiny_digits_dit, tiny_digits_dit.with_suffix(".json")):
        shutil.copy(src, model.parent / src.name)
    out = tmp_path / "out"
    args = [model, "--target", tmp_path / "t.json", "--out", out, "--samples", 4, "--calibration-samples", 2]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--latency-repeats", 0]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    trt = report["artifacts"]["tensorrt"]
    assert trt["lint"]["denoiser.onnx"]["errors"] == 0 and trt["lint"]["denoiser.onnx"]["dequantize_nodes"]["INT8"]
    text = (out / "report.md").read_text()
    assert "## TensorRT" in text and "| denoiser.onnx |" in text
    if unavailable() is not None:
        assert f"engines: not built: {unavailable()}" in text and "verified and timed with onnxruntime" in text
        assert report["backend_details"]["why_not_tensorrt"] == unavailable()
        # The verification header names what ran the candidate, not the backend it stood in for.
        runtime = report["backend_details"]["executed_by"]
        assert f"candidate = lowered artifact on {runtime} (CPUExecutionProvider), in place of tensorrt;" in text
    png = tmp_path / "s.png"
    assert CliRunner().invoke(main, ["sample", str(out), "--seed", "1", "--out", str(png)]).exit_code == 0
