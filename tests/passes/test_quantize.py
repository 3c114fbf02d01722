"""Issue 3: the quantize pass, timestep-aware calibration and Q/DQ lowering, on the trained shipped models."""

import collections
import dataclasses

import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import run_recipe
from torch import nn

from backends.ort import OrtDenoiser
from backends.qdq import export_quantized
from calibration import capture as calib
from calibration import selection
from calibration.capture import evaluation_set
from core.adapters import denoiser_module, torch_denoise
from core.errors import ConfigError, ExportError
from core.quantized import QuantizedLayer, export_mode, quantized_layers
from core.sampling import take
from passes.manager import plan_passes
from verify.fidelity import per_step_error, replay_error

ALL = frozenset({"fp32", "int8", "fp8", "int4-weights", "nvfp4"})


@pytest.fixture(scope="module")
def dit_calibration(dit_program):
    return calib.capture(dit_program, *evaluation_set(dit_program, 8, 10_000))


@pytest.fixture(scope="module")
def dit_heldout(dit_program):
    return calib.capture(dit_program, *evaluation_set(dit_program, 10, 0))


def quantize(program, trajectories, capabilities=ALL, **config):
    recipe = [{"pass": "quantize", "config": config}]
    return run_recipe(program, trajectories, recipe, capabilities, rng=torch.Generator().manual_seed(0))


def heldout_error(program, trajectories) -> float:
    errors = per_step_error(trajectories, torch_denoise(program))
    return sum(errors) / len(errors)


def test_selection_is_stratified_over_the_plan_steps(dit_calibration):
    g = torch.Generator().manual_seed(0)
    inputs = selection.select(dit_calibration, "timestep", 40, g)
    assert collections.Counter(inputs.steps.tolist()) == {s: 2 for s in range(20)}
    assert torch.equal(inputs.t, dit_calibration.t[inputs.steps])
    skewed = selection.select(dit_calibration, "skewed", 200, g)
    counts = collections.Counter(skewed.steps.tolist())
    mid = int(torch.argmin((dit_calibration.t / 1000 - 0.4).abs()))
    assert counts[mid] == max(counts.values()) and counts[mid] > 3 * counts.get(0, 0)
    naive = selection.select(dit_calibration, "random", 16, g)
    assert (naive.steps == -1).all() and naive.x.shape == (16, 1, 16, 16) and naive.cond["class_labels"].max() <= 10
    with pytest.raises(ConfigError, match="unknown calibration method"):
        selection.select(dit_calibration, "best", 4, g)


def test_bad_configs_are_refused_before_running():
    cpu = frozenset({"fp32", "int8"})
    with pytest.raises(ConfigError, match="fp8 needs the 'fp8' capability, which this target lacks"):
        plan_passes([{"pass": "quantize", "config": {"weights": "fp8", "activations": "fp8"}}], cpu)
    with pytest.raises(ConfigError, match="nvfp4 needs the 'nvfp4' capability"):
        plan_passes([{"pass": "quantize", "config": {"weights": "nvfp4", "activations": "none"}}], cpu | {"fp8"})
    with pytest.raises(ConfigError, match="nvfp4 activations need nvfp4 weights"):
        plan_passes([{"pass": "quantize", "config": {"weights": "int8", "activations": "nvfp4"}}], ALL)
    with pytest.raises(ConfigError, match="unknown weight format 'int3'"):
        plan_passes([{"pass": "quantize", "config": {"weights": "int3"}}], ALL)
    with pytest.raises(ConfigError, match="smoothquant alpha"):
        plan_passes([{"pass": "quantize", "config": {"smoothquant": 1.5}}], ALL)
    # Ordered by phase, whatever the recipe's order: the loop first, number formats after.
    planned = plan_passes([{"pass": "quantize"}, {"pass": "sampler", "config": {"sampling_steps": 10}}], ALL)
    assert [p.name for p in planned] == ["sampler", "quantize"]


def test_int8_pass_keeps_temporal_modules_and_leaves_the_reference_alone(dit_program, dit_calibration):
    before = {k: v.clone() for k, v in dit_program.denoiser.state_dict().items()}
    q = quantize(dit_program, dit_calibration)
    assert all(torch.equal(v, before[k]) for k, v in dit_program.denoiser.state_dict().items())
    layers = quantized_layers(q.denoiser)
    assert len(layers) == 50 and all(layer.fmt.describe() == "W8A8 (int8/uint8)" for layer in layers.values())
    for name in dit_program.spec.temporal_modules:
        assert not any(isinstance(m, QuantizedLayer) for m in q.denoiser.get_submodule(name).modules())
    notes = q.decision("quantize").to_dict()
    assert notes["weight_bits"]["stored"] < 0.65 * notes["weight_bits"]["fp32_equivalent"]
    # q, k and v read the same tensor, so they share one activation range
    block = q.denoiser.transformer_blocks[0].attn1
    assert block.to_q.act_range == block.to_k.act_range == block.to_v.act_range


def test_timestep_calibration_beats_random_calibration_at_equal_bits(dit_program, dit_calibration, dit_heldout):
    ours = heldout_error(quantize(dit_program, dit_calibration), dit_heldout)
    naive = heldout_error(quantize(dit_program, dit_calibration, calibration="random"), dit_heldout)
    assert ours < 0.9 * naive


def test_fallback_reverts_the_most_sensitive_layer_first(dit_program, dit_calibration, dit_heldout):
    q = quantize(dit_program, dit_calibration, max_eps_error=0.03, max_fallback=3)
    notes = q.decision("quantize").to_dict()
    assert notes["error_before_fallback"] > 0.03 >= notes["error_after_fallback"]
    reverted = [f["layer"] for f in notes["fallback"]]
    assert reverted and not any(isinstance(q.denoiser.get_submodule(n), QuantizedLayer) for n in reverted)
    solo = [f["solo_error"] for f in notes["fallback"]]
    assert solo == sorted(solo, reverse=True)
    no_fallback = quantize(dit_program, dit_calibration)
    assert heldout_error(q, dit_heldout) < heldout_error(no_fallback, dit_heldout)


def test_end_to_end_budget_judges_the_loops_samples(dit_program):
    """max_sample_error: the fallback keeps the free-running samples on the calibration seeds within budget
    (what a few-step loop needs: its per-step errors compound), and that holds on held-out seeds too."""
    program = dit_program.replace(plan=dataclasses.replace(dit_program.plan, num_inference_steps=4))
    calibration = calib.capture(program, *evaluation_set(program, 8, 10_000))
    heldout = calib.capture(program, *evaluation_set(program, 10, 0))
    w4a8 = {"weights": "int4", "activations": "fp8"}
    plain = quantize(program, calibration, **w4a8)
    before = replay_error(plain, calibration)
    budget = 0.7 * before
    q = quantize(program, calibration, **w4a8, max_sample_error=budget, max_fallback=6)
    notes = q.decision("quantize").to_dict()
    assert notes["measure"].startswith("end-to-end") and notes["fallback"]
    assert notes["error_before_fallback"] == pytest.approx(before, rel=1e-6)
    assert notes["error_after_fallback"] <= budget
    assert replay_error(q, calibration) == pytest.approx(notes["error_after_fallback"], rel=1e-6)
    assert replay_error(q, heldout) < replay_error(plain, heldout)
    with pytest.raises(ConfigError, match="not both"):
        plan_passes([{"pass": "quantize", "config": {"max_eps_error": 0.1, "max_sample_error": 0.1}}], ALL)


def test_smoothquant_folding_preserves_the_function(dit_program, dit_calibration):
    q = quantize(dit_program, dit_calibration, smoothquant=0.5)
    assert q.decision("quantize").smoothed_layers > 0
    x, t, y = dit_calibration.x[5, :4], dit_calibration.t[5].expand(4), take(dit_calibration.cond, slice(0, 4))
    module = denoiser_module(q)
    with export_mode(module), torch.no_grad():  # smoothing without rounding: the original function
        smoothed = module.apply(x, t, y)
    assert torch.allclose(smoothed, torch_denoise(dit_program)(x, t, y), atol=1e-4)


def _optimized_ops(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_int8_lowering_runs_integer_kernels_in_ort(dit_program, dit_calibration, tmp_path):
    # The cpu-int8 recipe's 7-bit weights: ORT's U8S8 kernels on x86 without VNNI saturate on full-range ones.
    q = quantize(dit_program, dit_calibration, reduce_range=True)
    path = export_quantized(denoiser_module(q), q.spec, tmp_path / "q.onnx")
    model = onnx.load(str(path))
    weights = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_quantized")]
    layers = quantized_layers(q.denoiser)
    assert len(weights) == len(layers) and all(w.min() >= -64 and w.max() <= 63 for w in weights)
    # One QuantizeLinear per distinct layer input (q/k/v share theirs) and per quantized conv output; one
    # DequantizeLinear for each of those and each weight; every quantized Linear runs as an integer MatMul.
    inputs = _distinct_layer_inputs(q, dit_calibration)
    outputs = sum(m.out_range is not None for m in layers.values())
    graph = collections.Counter(n.op_type for n in model.graph.node)
    assert graph["QuantizeLinear"] == inputs + outputs and graph["DequantizeLinear"] == len(layers) + inputs + outputs
    linear = sum(isinstance(m.inner, nn.Linear) for m in layers.values())
    assert _optimized_ops(path, tmp_path)["MatMulIntegerToFloat"] == linear
    x, t, y = dit_calibration.x[10], dit_calibration.t[10].expand(dit_calibration.x.shape[1]), dit_calibration.cond
    emulated, lowered = torch_denoise(q)(x, t, y), OrtDenoiser(path)(x, t, y)
    reference = dit_calibration.output[10]
    err = float((lowered - reference).norm() / reference.norm())
    # the lowered graph does what the emulation does, up to 1-LSB flips of fp32 reordering
    assert float((lowered - emulated).norm() / emulated.norm()) < 0.5 * err


def _distinct_layer_inputs(q, trajectories) -> int:
    """How many distinct tensors the quantized layers read in one forward (shared inputs count once)."""
    seen: dict[int, torch.Tensor] = {}  # the tensors kept alive, so no freed buffer is reused by another
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: seen.setdefault(args[0].data_ptr(), args[0]))
        for m in quantized_layers(q.denoiser).values()
    ]
    x, t = trajectories.x[0][:1], trajectories.t[0].expand(1)
    torch_denoise(q)(x, t, take(trajectories.cond, slice(0, 1)))
    for hook in hooks:
        hook.remove()
    return len(seen)


def test_unet_convs_get_quantized_outputs_and_fuse(unet_program, tmp_path):
    calibration = calib.capture(unet_program, *evaluation_set(unet_program, 4, 10_000))
    q = quantize(unet_program, calibration, capabilities=frozenset({"fp32", "int8"}))
    convs = [m for m in quantized_layers(q.denoiser).values() if isinstance(m.inner, nn.Conv2d)]
    assert convs and all(m.out_range is not None for m in convs)
    path = export_quantized(denoiser_module(q), q.spec, tmp_path / "unet.onnx")
    assert _optimized_ops(path, tmp_path)["QLinearConv"] >= len(convs) - 2


def lowers_to_qdq_that_ort_executes(q, trajectories, path, weight_types):
    """The Q/DQ graph holds quantized weights of these ONNX types and ORT runs it like the torch emulation."""
    path = export_quantized(denoiser_module(q), q.spec, path)
    model = onnx.load(str(path))
    types = {i.data_type for i in model.graph.initializer if i.name.endswith("weight_quantized")}
    assert set(weight_types) <= types
    x, t, y = trajectories.x[10], trajectories.t[10].expand(trajectories.x.shape[1]), trajectories.cond
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the plain Q/DQ semantics
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    lowered = torch.from_numpy(
        session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y["class_labels"].numpy()})[0]
    )
    emulated = torch_denoise(q)(x, t, y)
    assert float((lowered - emulated).norm() / emulated.norm()) < 0.01
    return path


def test_nvfp4_is_emulated_and_refuses_lowering_clearly(dit_program, dit_calibration, dit_heldout, tmp_path):
    q = quantize(dit_program, dit_calibration, weights="nvfp4", activations="nvfp4")
    fmt = {layer.fmt.describe() for layer in quantized_layers(q.denoiser).values()}
    assert "W4A4 (nvfp4/nvfp4)" in fmt and "W8A8 (fp8/fp8)" in fmt  # the patch-embedding conv keeps 8 bits
    assert heldout_error(q, dit_heldout) < 0.5
    with pytest.raises(ExportError, match="NVFP4 has no ONNX Runtime kernels"):
        export_quantized(denoiser_module(q), q.spec, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_quant_compare_rows_are_measured_side_by_side(tiny_digits_program):
    from bench.quant_compare import compare_quantization, markdown_table

    rows = [("ours", {}, "ort"), ("naive data", {"calibration": "random"}, "torch")]
    results = compare_quantization(
        tiny_digits_program, 4, 2, lambda it, **_: it, lambda _: None, rows=rows, peers=False
    )
    assert [r["name"] for r in results] == ["ours", "naive data"]
    assert results[0]["onnx_bytes"] < results[0]["fp32_onnx_bytes"] and results[1]["onnx_bytes"] is None
    assert all(10 < r["psnr_db_mean"] < 100 and r["class_agreement_reference"] is not None for r in results)
    table = markdown_table(results)
    assert table.count("\n| ") == 2 and "n/a (emulated)" in table


def test_formats_per_layer_by_sensitivity_and_integer_programming(dit_program, tmp_path):
    """W4A8 over budget: the integer program moves layers to FP8 (or fp32) for the fewest weight bits within
    the budget; the greedy fallback can only revert to fp32, so it stores more bits for the same budget."""
    dit_calibration = calib.capture(dit_program, *evaluation_set(dit_program, 2, 10_000))  # 4 rows: cheaper checks
    w4a8 = {"weights": "int4", "activations": "fp8"}
    plain = quantize(dit_program, dit_calibration, **w4a8).decision("quantize").to_dict()
    budget = 0.3 * plain["error_before_fallback"]
    greedy = quantize(dit_program, dit_calibration, **w4a8, max_eps_error=budget, max_fallback=64)
    ip = quantize(dit_program, dit_calibration, **w4a8, max_eps_error=budget, fallback_formats=["fp8"])
    notes, greedy_notes = ip.decision("quantize").to_dict(), greedy.decision("quantize").to_dict()
    assert notes["error_after_fallback"] <= budget < notes["error_before_fallback"]
    assigned = notes["allocation"]["assigned"]
    assert "fp8" in assigned.values()
    assert notes["weight_bits"]["stored"] < greedy_notes["weight_bits"]["stored"]
    for name, key in assigned.items():
        module = ip.denoiser.get_submodule(name)
        assert (key == "fp32") != isinstance(module, QuantizedLayer)
        assert key == "fp32" or module.fmt.weights == key
    assert "Per-layer formats by sensitivity + integer programming" in "\n".join(ip.decision("quantize").markdown())
    # Mixed formats lower: INT4 and FP8 weights in one Q/DQ graph, executed by ORT like the emulation (FP8
    # and INT4 lowering are tested here; INT8 in test_int8_lowering_runs_integer_kernels_in_ort).
    path = lowers_to_qdq_that_ort_executes(
        ip, dit_calibration, tmp_path / "w4a8.onnx", [onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN]
    )
    assert path.stat().st_size < 0.85 * 4 * sum(p.numel() for p in dit_program.denoiser.parameters())
    # Pinned per layer (what bench --scale replays): the same formats, no new choice.
    replay = quantize(dit_program, dit_calibration, **w4a8, layer_weights=assigned)
    formats = {n: q.fmt.weights for n, q in quantized_layers(replay.denoiser).items()}
    assert formats == {n: q.fmt.weights for n, q in quantized_layers(ip.denoiser).items()}
    with pytest.raises(ConfigError, match="unknown weight format 'int2'"):
        plan_passes([{"pass": "quantize", "config": {"fallback_formats": ["int2"]}}], ALL)
    with pytest.raises(ConfigError, match="fp8 needs the 'fp8' capability"):
        plan_passes([{"pass": "quantize", "config": {"layer_weights": {"proj_out_2": "fp8"}}}], ALL - {"fp8"})


def test_a_layer_reached_through_a_sliced_module_list_is_matched_by_its_module_path():
    from backends.qdq import module_path

    # diffusers' UNet mid block iterates self.resnets[1:]: the exporter names that path with the slice.
    assert module_path("shell.mid_block.resnets.slice(1, None, None).0.conv1") == "shell.mid_block.resnets.1.conv1"
    assert module_path("m.blocks.slice(None, None, 2).3.proj") == "m.blocks.6.proj"
    assert module_path("model.mid_block.resnets.1.conv2") == "model.mid_block.resnets.1.conv2"


def test_int8_with_a_cache_schedule_lowers_every_layer_of_the_sd_unet_full_step(text_folders, tmp_path):
    """Found by re-measuring cpu-auto: the full step of a cached SD UNet reaches the mid block's second
    resnet through a sliced ModuleList, and its two convolutions were reported missing (ExportError)."""
    from helpers import lower

    from calibration.capture import capture_calibration
    from core.loading import load_program

    program = load_program(text_folders["sd"])
    program = program.replace(plan=dataclasses.replace(program.plan, num_inference_steps=6))
    recipe = [
        {"pass": "quantize", "config": {"weights": "int8", "activations": "uint8", "calibration": "timestep"}},
        {"pass": "cache", "config": {"flops_budget": 0.9}},
    ]
    quantized = run_recipe(program, capture_calibration(program, 2), recipe, frozenset({"fp32", "int8"}))
    assert quantized.plan.cache is not None
    lower(quantized, tmp_path / "artifact")
    full = onnx.load(str(tmp_path / "artifact" / "denoiser_full.onnx"), load_external_data=False)
    dequantized = [n.name for n in full.graph.node if n.op_type == "DequantizeLinear"]
    weights = {name.removesuffix(".weight_DequantizeLinear") for name in dequantized}
    assert set(quantized_layers(denoiser_module(quantized).model)) <= weights
    assert {"mid_block.resnets.1.conv1", "mid_block.resnets.1.conv2"} <= weights


class CountingCheck:
    """A stand-in for verify.floor_check.FloorCheck: the shift grows with the layers still quantized."""

    floor = 0.5

    def __init__(self, original, *_, **__):
        pass

    def shift(self, candidate):
        return 0.1 + 0.02 * sum(m.emulate for m in quantized_layers(candidate.denoiser).values())


@pytest.mark.parametrize(("limit", "held"), [(20, True), (5, False)])
def test_the_distribution_check_reverts_the_most_sensitive_layers_until_quantization_adds_at_most_its_bound(
    tiny_digits_program, monkeypatch, limit, held
):
    """The check's bookkeeping, with a stand-in check (mechanics: the tiny random DiT; the real check on the
    trained DiT is the next test)."""
    monkeypatch.setattr("passes.analyses.FloorCheck", CountingCheck)
    program = tiny_digits_program
    calibration = calib.capture(program, *evaluation_set(program, 4, 10_000))
    plain = quantize(program, calibration)
    n = len(quantized_layers(plain.denoiser))
    assert n > 10
    bound = 0.02 * (n - 10)
    q = quantize(program, calibration, max_fd_shift_added=bound, max_fallback=limit)
    d = q.decision("quantize").distribution
    # The input (nothing quantized) at 0.1; quantized, 0.1 + 0.02 n; within 0.1 + bound with 10 layers in fp32.
    need = 10
    assert d["input_shift"] == pytest.approx(0.1) and d["quantized_shift"] == pytest.approx(0.1 + 0.02 * n)
    reverted = d["reverted"]
    assert len(reverted) == (need if held else limit) and d["held"] is held
    assert [r["fd_shift_after"] for r in reverted] == pytest.approx(
        [0.1 + 0.02 * (n - k - 1) for k in range(len(reverted))]
    )
    solo = [r["solo_error"] for r in reverted]
    assert solo == sorted(solo, reverse=True)
    assert not any(isinstance(q.denoiser.get_submodule(r["layer"]), QuantizedLayer) for r in reverted)
    assert len(quantized_layers(q.denoiser)) == n - len(reverted)
    assert ("not reached within max_fallback" in "\n".join(q.decision("quantize").markdown())) is not held


def test_the_distribution_check_of_quantization_measures_what_it_reports(dit_program):
    """On the trained DiT at 4 steps with W4A8 (real checks, 20 samples): the shift it reports for its result
    is the shift a distribution check measures on the returned program, and it added at most its bound."""
    from verify.floor_check import FloorCheck

    program = dit_program.replace(plan=dataclasses.replace(dit_program.plan, num_inference_steps=4))
    calibration = calib.capture(program, *evaluation_set(program, 8, 10_000))
    config = {"weights": "int4", "activations": "fp8", "max_fd_shift_added": 0.002, "check_samples": 20}
    q = quantize(program, calibration, **config, max_fallback=12)
    d = q.decision("quantize").distribution
    assert d["quantized_shift"] - d["input_shift"] > 0.002  # W4A8 moves this model's distribution
    check = FloorCheck(program, 20)
    assert check.shift(program) == pytest.approx(d["input_shift"], rel=1e-6)
    assert check.shift(q) == pytest.approx(d["final_shift"], rel=1e-6)
    assert d["final_shift"] < d["quantized_shift"] and d["reverted"]
    assert d["held"] == (d["final_shift"] - d["input_shift"] <= 0.002)


def test_the_quantize_distribution_options_are_checked_before_any_work():
    with pytest.raises(ConfigError, match=r"quantize: max_fd_shift_added must be in \[0, 100\]"):
        plan_passes([{"pass": "quantize", "config": {"max_fd_shift_added": -0.1}}], ALL)
    with pytest.raises(ConfigError, match=r"quantize: check_samples must be in \[4, "):
        plan_passes([{"pass": "quantize", "config": {"check_samples": 2}}], ALL)
