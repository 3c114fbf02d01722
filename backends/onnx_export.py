"""Export the denoiser to ONNX (opset >= 18, eval mode, dynamic batch); refuse graphs with random ops."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from core.conditions import example_conditions
from core.errors import ExportError
from core.fileio import write_atomic
from core.ir import ModelSpec

MIN_OPSET = 18
OUTPUT_NAME = "model_output"  # epsilon, v or x0, as the spec's prediction_type says
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


LOOP_INPUTS = ("sample", "timestep")  # then the condition tensors (spec order), then carried tensors


def input_names(spec: ModelSpec) -> list[str]:
    return [*LOOP_INPUTS, *spec.conditioning.input_names]


def example_inputs(spec: ModelSpec, batch: int = 2) -> tuple[torch.Tensor, ...]:
    x = torch.randn(batch, *spec.sample_shape)
    t = torch.full((batch,), 500.0)
    return (x, t, *example_conditions(spec.conditioning, batch).values())


def batch_shapes(module: nn.Module, count: int) -> dict[str, Any]:
    """torch.export dynamic shapes for `count` positional inputs, all with a dynamic batch dimension
    (named parameters first, then the module's *varargs)."""
    batch = torch.export.Dim.AUTO  # ranges and equalities inferred (e.g. a model guards batch < 64)
    shapes: dict[str, Any] = {}
    for param in inspect.signature(module.forward).parameters.values():
        if param.kind == param.VAR_POSITIONAL:
            shapes[param.name] = tuple({0: batch} for _ in range(count - len(shapes)))
            return shapes
        if len(shapes) < count:
            shapes[param.name] = {0: batch}
    return shapes


def export_onnx(
    denoiser: nn.Module,
    spec: ModelSpec,
    path: Path,
    opset: int = MIN_OPSET,
    dynamo: bool = True,
    carried_in: Mapping[str, torch.Tensor] | None = None,
    carried_out: Sequence[str] = (),
) -> Path:
    """Write `path` atomically; `denoiser` is called as (sample, timestep, *condition tensors,
    *carried_in) and returns the model output, followed by the `carried_out` tensors when there are any.
    `carried_in` holds example values (batch 2) of the tensors a cached variant reads."""
    if carried_in and not dynamo:
        raise ExportError("graph variants with carried tensors export with dynamo only")
    carried_in = dict(carried_in or {})
    args = (*example_inputs(spec), *carried_in.values())
    names = input_names(spec) + list(carried_in)
    return export_graph(denoiser, args, names, [OUTPUT_NAME, *carried_out], path, opset, dynamo)


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    names: Sequence[str],
    outputs: Sequence[str],
    path: Path,
    opset: int = MIN_OPSET,
    dynamo: bool = True,
) -> Path:
    """Export `module(*args)` (every input with a dynamic batch dimension) to `path`, atomically, and
    check the graph: the denoiser's variants and the pipeline's stages (prompt encoder, decoder) alike."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET} is not supported")
    module.eval()
    names, outputs = list(names), list(outputs)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            if dynamo:
                program = torch.onnx.export(
                    module,
                    args,
                    input_names=names,
                    output_names=outputs,
                    opset_version=opset,
                    dynamo=True,
                    dynamic_shapes=batch_shapes(module, len(args)),
                    verbose=False,
                )
                program.save(str(tmp))
                drop_noop_squeezes(tmp)
            else:
                torch.onnx.export(
                    module,
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


def drop_noop_squeezes(path: Path) -> None:
    """torch's squeeze(dim) of a dimension that is not 1 is a no-op, but the exporter emits an ONNX
    Squeeze, which refuses it (e.g. PixArt's output tokens): make those Identity."""
    model = onnx.load(str(path))
    shapes = {v.name: v.type.tensor_type.shape for v in [*model.graph.value_info, *model.graph.input]}
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    constants |= {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    changed = False
    for node in model.graph.node:
        if node.op_type != "Squeeze" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        shape = shapes.get(node.input[0])
        axes = [int(a) for a in constants[node.input[1]].reshape(-1)]
        if shape is None or not shape.dim:
            continue
        dims = [shape.dim[a] for a in axes if -len(shape.dim) <= a < len(shape.dim)]
        if dims and all(d.HasField("dim_value") and d.dim_value != 1 for d in dims):
            node.op_type = "Identity"
            del node.input[1:]
            changed = True
    if changed:
        onnx.save(model, str(path))


def check_graph(model: onnx.ModelProto) -> None:
    """Shipping a graph that samples its own noise would break seed-for-seed verification."""
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    if found := sorted(ops & RANDOM_OPS):
        raise ExportError(f"exported graph contains random ops {found}; export the model in eval mode")
