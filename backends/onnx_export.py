"""Export the denoiser to ONNX (opset >= 18, eval mode, dynamic batch); refuse graphs with random ops."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from core.errors import ExportError
from core.fileio import write_atomic
from core.ir import ModelSpec

MIN_OPSET = 18
OUTPUT_NAME = "model_output"  # epsilon, v or x0, as the spec's prediction_type says
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


STANDARD_INPUTS = ("sample", "timestep", "class_labels")  # every other graph input is a carried tensor


def input_names(spec: ModelSpec) -> list[str]:
    return ["sample", "timestep"] + (["class_labels"] if spec.conditioning.num_classes else [])


def example_inputs(spec: ModelSpec, batch: int = 2) -> tuple[torch.Tensor, ...]:
    x = torch.randn(batch, *spec.sample_shape)
    t = torch.full((batch,), 500.0)
    if not spec.conditioning.num_classes:
        return (x, t)
    return (x, t, torch.arange(batch, dtype=torch.int64) % spec.conditioning.num_classes)


def export_onnx(
    denoiser: nn.Module,
    spec: ModelSpec,
    path: Path,
    opset: int = MIN_OPSET,
    dynamo: bool = True,
    carried_in: Mapping[str, torch.Tensor] | None = None,
    carried_out: Sequence[str] = (),
) -> Path:
    """Write `path` atomically; `denoiser` is called as (sample, timestep, [class_labels], **carried_in)
    and returns the model output, followed by the `carried_out` tensors when there are any.
    `carried_in` holds example values (batch 2) of the tensors a cached variant reads."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET} is not supported")
    if carried_in and not dynamo:
        raise ExportError("graph variants with carried tensors export with dynamo only")
    denoiser.eval()
    carried_in = dict(carried_in or {})
    args = example_inputs(spec)
    names = input_names(spec) + list(carried_in)
    outputs = [OUTPUT_NAME, *carried_out]
    batch = torch.export.Dim("batch", min=1, max=4096)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            if dynamo:
                kwargs = dict(zip(names[2:], args[2:], strict=False)) | carried_in
                program = torch.onnx.export(
                    denoiser,
                    args[:2],
                    kwargs=kwargs,
                    input_names=names,
                    output_names=outputs,
                    opset_version=opset,
                    dynamo=True,
                    dynamic_shapes={name: {0: batch} for name in ["sample", "timestep", *kwargs]},
                    verbose=False,
                )
                program.save(str(tmp))
            else:
                torch.onnx.export(
                    denoiser,
                    args,
                    str(tmp),
                    input_names=names,
                    output_names=outputs,
                    opset_version=opset,
                    dynamo=False,
                    dynamic_axes={n: {0: "batch"} for n in [*names, *outputs]},
                )
        check_graph(onnx.load(str(tmp)))

    try:
        write_atomic(path, write)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return path


def check_graph(model: onnx.ModelProto) -> None:
    """Shipping a graph that samples its own noise would break seed-for-seed verification."""
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    if found := sorted(ops & RANDOM_OPS):
        raise ExportError(f"exported graph contains random ops {found}; export the model in eval mode")
