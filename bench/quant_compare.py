"""Side by side on one model and one evaluation set: quantization configurations and naive baselines.

Rows run as lowered ONNX in ONNX Runtime where the format has CPU kernels (int8, fp8, int4 Q/DQ), in
torch emulation otherwise (NVFP4). Baselines: our pass fed random calibration inputs (only the data
differs), and ONNX Runtime's own `quantize_static` with its defaults, fed random inputs as Olive's
Stable Diffusion recipe does, or fed our timestep-stratified inputs; and NVIDIA Model Optimizer's
INT8/FP8 default configs (torch fake quantization, which runs on CPU) fed either.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.ort import OrtDenoiser
from backends.registry import get_backend
from bench.comparison import comparison_set
from calibration import selection
from core.adapters import denoiser_module, torch_denoise
from core.conditions import encode
from core.ir import DiffusionProgram
from core.sampling import sample
from core.schedulers import build_scheduler
from passes.manager import offline_context, plan_passes, run_passes
from verify.fidelity import per_step_error
from verify.verdict import Verdict, floor_cell

ALL_CAPABILITIES = frozenset({"fp32", "int8", "fp8", "int4-weights", "nvfp4"})

# (row name, quantize config, how it runs)
ROWS: list[tuple[str, dict[str, Any], str]] = [
    ("ours int8 W8A8 (cpu-int8 recipe)", {"max_eps_error": 0.02}, "ort"),
    ("ours int8 W8A8, no fallback", {}, "ort"),
    ("ours int8 W8A8, no fallback, skewed (PTQ4DM) data", {"calibration": "skewed"}, "ort"),
    ("ours int8 W8A8, no fallback, SmoothQuant 0.5", {"smoothquant": 0.5}, "ort"),
    ("same, random calibration data (naive)", {"calibration": "random"}, "ort"),
    ("same, temporal modules quantized too", {"keep_temporal": False}, "ort"),
    ("same, random data, temporal modules quantized too", {"calibration": "random", "keep_temporal": False}, "ort"),
    ("ours fp8 W8A8 (h100-fp8 numerics)", {"weights": "fp8", "activations": "fp8"}, "ort"),
    ("ours int4 W4A8 (h100-fp4 numerics)", {"weights": "int4", "activations": "fp8"}, "ort"),
    (
        "same W4A8, temporal modules quantized too",
        {"weights": "int4", "activations": "fp8", "keep_temporal": False},
        "ort",
    ),
    ("ours NVFP4 W4A4 (b200-fp4 numerics)", {"weights": "nvfp4", "activations": "nvfp4"}, "torch"),
]


def compare_quantization(
    program: DiffusionProgram,
    samples: int,
    calibration_samples: int,
    progress: Callable,
    log: Callable[[str], None],
    rows: list[tuple[str, dict[str, Any], str]] | None = None,
    peers: bool = True,
) -> list[dict[str, Any]]:
    num_classes = program.spec.conditioning.num_classes
    trajectories, seeds, conditions, reference, verdict = comparison_set(program, samples, calibration_samples, log)
    batch = encode(program, conditions, len(seeds))
    results: list[dict[str, Any]] = []
    denoise: Callable[..., Any]
    with tempfile.TemporaryDirectory(prefix="quant-compare-") as tmp:
        work = Path(tmp)
        onnxruntime = get_backend({"name": "onnxruntime"})
        fp32 = onnxruntime.lower(program, work / "fp32")
        for name, config, runs in progress(ROWS if rows is None else rows, desc="configurations"):
            log(name)
            ctx = offline_context(program, trajectories, ALL_CAPABILITIES)
            candidate = run_passes(
                program, plan_passes([{"pass": "quantize", "config": config}], ALL_CAPABILITIES), ctx
            )
            notes = candidate.decision("quantize").to_dict()
            if runs == "ort":
                folder = work / f"row{len(results)}"
                size = onnxruntime.lower(candidate, folder)["onnx_bytes"]
                denoise = OrtDenoiser(folder / "denoiser.onnx", condition_names=program.spec.conditioning.input_names)
            else:
                size, denoise = None, torch_denoise(candidate)
            row = _evaluate(program, reference, seeds, batch, denoise, verdict)
            row.update(
                name=name,
                runs=runs,
                onnx_bytes=size,
                weight_mb=notes["weight_bits"]["stored"] / 8e6,
                fallback=[f["layer"] for f in notes["fallback"]],
            )
            results.append(row)
        if peers:
            fp32_onnx = work / "fp32" / "denoiser.onnx"
            steps = build_scheduler(program.plan).config.num_train_timesteps
            variants = [
                (f"{setting}, {label} data", tuned, method)
                for setting, tuned in (
                    ("ORT quantize_static defaults (all ops, S8S8, per-tensor)", False),
                    ("ORT quantize_static U8S8 per-channel, MatMul/Gemm/Conv only", True),
                )
                for label, method in (("random", "random"), ("our timestep-stratified", "timestep"))
            ]
            for i, (name, tuned, method) in enumerate(variants):
                log(name)
                inputs = selection.select(
                    trajectories, method, 256, torch.Generator().manual_seed(0), steps, num_classes
                )
                path = work / f"ort-{i}.onnx"
                try:
                    _ort_quantize_static(fp32_onnx, path, inputs, tuned)
                except Exception as exc:  # a peer tool that cannot quantize this model is a result too
                    results.append(_failed(name, "ort", exc))
                    continue
                graph = OrtDenoiser(path, condition_names=program.spec.conditioning.input_names)
                row = _evaluate(program, reference, seeds, batch, graph, verdict)
                row.update(name=name, runs="ort", onnx_bytes=path.stat().st_size, weight_mb=None, fallback=[])
                results.append(row)
            for cfg_name in ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"):
                for label, method in (("random", "random"), ("our timestep-stratified", "timestep")):
                    name = f"modelopt {cfg_name} (max calibration), {label} data"
                    log(name)
                    inputs = selection.select(
                        trajectories, method, 256, torch.Generator().manual_seed(0), steps, num_classes
                    )
                    try:
                        denoise = _modelopt_quantized(program, cfg_name, inputs)
                    except Exception as exc:
                        results.append(_failed(name, "torch", exc))
                        continue
                    row = _evaluate(program, reference, seeds, batch, denoise, verdict)
                    row.update(name=name, runs="torch", onnx_bytes=None, weight_mb=None, fallback=[])
                    results.append(row)
    for row in results:
        row["fp32_onnx_bytes"] = fp32["onnx_bytes"]
    return results


def _failed(name: str, runs: str, exc: Exception) -> dict[str, Any]:
    return {"name": name, "runs": runs, "failed": f"{type(exc).__name__}: {exc}", "onnx_bytes": None, "fallback": []}


def _modelopt_quantized(program: DiffusionProgram, config_name: str, inputs: selection.CalibrationInputs) -> Callable:
    """NVIDIA Model Optimizer's fake quantization (runs on CPU for INT8 and FP8), calibrated on `inputs`."""
    import copy

    import modelopt.torch.quantization as mtq

    quantized = program.replace(denoiser=copy.deepcopy(program.denoiser).eval())
    module = denoiser_module(quantized)

    def forward_loop(_model: Any) -> None:
        with torch.no_grad():
            for x, t, cond in inputs.batches(64):
                module.apply(x, t, cond)

    mtq.quantize(quantized.denoiser, getattr(mtq, config_name), forward_loop)
    return torch_denoise(quantized)


def _evaluate(
    program: DiffusionProgram, reference: Any, seeds: list[int], batch: Any, denoise: Callable, verdict: Verdict
) -> dict[str, Any]:
    candidate = sample(program.plan, program.spec.sample_shape, denoise, seeds, batch)
    summary = verdict(candidate, per_step_error(reference, denoise))
    keys = (
        "psnr_db_mean",
        "psnr_db_min",
        "ssim_mean",
        "eps_rel_error_mean",
        "class_agreement_candidate",
        "class_agreement_reference",
        "fd_candidate_to_data",
        "fd_reference_to_data",
        *(f"fd_self_{k}" for k in ("ratio", "candidate", "floor")),
    )
    return {k: summary[k] for k in keys if k in summary}


def _ort_quantize_static(fp32: Path, out: Path, inputs: selection.CalibrationInputs, tuned: bool) -> None:
    """ONNX Runtime's own PTQ: its defaults, or `tuned` the way its docs recommend for x86 (U8S8, per channel)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(list(inputs.batches(32)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            x, t, cond = batch
            return {"sample": x.numpy(), "timestep": t.numpy(), **{k: v.numpy() for k, v in cond.items()}}

    options: dict[str, Any] = {}
    if tuned:
        options = dict(
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        )
    quantize_static(str(fp32), str(out), Reader(), **options)


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| configuration | runs in | PSNR mean / min (dB) | SSIM mean | eps rel. error | class agreement | "
        "FD to data | shift (FD / floor), denoiser features | ONNX MB | fp32 layers kept by fallback |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['name']} | {r['runs']} | failed: {r['failed'][:120]} |||||||")
            continue
        agree = r.get("class_agreement_candidate")
        fd = r.get("fd_candidate_to_data")
        size = f"{r['onnx_bytes'] / 1e6:.2f}" if r["onnx_bytes"] else "n/a (emulated)"
        lines.append(
            f"| {r['name']} | {r['runs']} | {r['psnr_db_mean']:.1f} / {r['psnr_db_min']:.1f} | {r['ssim_mean']:.4f} | "
            f"{r['eps_rel_error_mean']:.4f} | {'n/a' if agree is None else f'{agree:.2f}'} | "
            f"{'n/a' if fd is None else f'{fd:.2f}'} | "
            f"{floor_cell(r, 'fd_self')} | "
            f"{size} | {', '.join(r['fallback']) or '-'} |"
        )
    if results:
        r = results[0]
        ref = [f"fp32 ONNX {r['fp32_onnx_bytes'] / 1e6:.2f} MB"]
        if r.get("class_agreement_reference") is not None:
            ref.append(f"class agreement {r['class_agreement_reference']:.2f}")
        if r.get("fd_reference_to_data") is not None:
            ref.append(f"FD to data {r['fd_reference_to_data']:.2f}")
        lines.append(f"\nReference (original, torch fp32): {', '.join(ref)}.")
    return "\n".join(lines)
