"""Export the denoiser to ONNX (opset >= 18, eval mode, dynamic batch); refuse graphs with random ops."""

from __future__ import annotations

import inspect
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from core.conditions import example_conditions
from core.errors import ExportError
from core.fileio import umask, write_atomic
from core.ir import ModelSpec

from . import graph_memo

MIN_OPSET = 18
INLINE_LIMIT = 1_500_000_000  # bytes of weights kept inside a graph file (protobuf's limit is 2 GiB)
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
            if count > len(shapes):  # an unconditional model passes none: torch.export then knows no such name
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
    check the graph: the denoiser's variants and the pipeline's stages (prompt encoder, decoder) alike.
    Weights over INLINE_LIMIT go to `<file>.data` beside it (see save_model)."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET} is not supported")
    module.eval()
    names, outputs = list(names), list(outputs)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            if dynamo:
                model = _dynamo_export(module, args, names, outputs, opset)
            else:
                buffer = io.BytesIO()
                torch.onnx.export(
                    module,
                    args,
                    buffer,
                    input_names=names,
                    output_names=outputs,
                    opset_version=opset,
                    dynamo=False,
                    dynamic_axes={n: {0: "batch"} for n in [*names, *outputs]},
                )
                model = onnx.load_from_string(buffer.getvalue())
        conv1d_as_conv2d(model)
        save_model(model, path)
        check_graph_file(path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return path


def _dynamo_export(
    module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], outputs: list[str], opset: int
) -> onnx.ModelProto:
    """torch.export + the ONNX translator, or the graph of an identical earlier export (backends.graph_memo)."""
    key = graph_memo.graph_key(module, args, names, outputs, opset)
    if (kept := graph_memo.recall(key)) is not None:
        return onnx.load_from_string(kept)
    model = torch.onnx.export(
        module,
        args,
        input_names=names,
        output_names=outputs,
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=batch_shapes(module, len(args)),
        verbose=False,
    ).model_proto
    drop_noop_squeezes(model)
    drop_stack_traces(model)
    if key is not None:  # a key means weights within MAX_GRAPH_BYTES: safe to serialize; keep() bounds the size
        graph_memo.keep(key, model.SerializeToString())
    return model


def data_file(path: Path) -> Path:
    """Where a graph's weights live when they do not fit in the graph file itself."""
    return path.with_name(path.name + ".data")


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path` atomically. Protobuf caps a serialized graph at 2 GiB, so when the weights
    exceed INLINE_LIMIT they go to one `<file>.data` beside it (written first, referenced by bare name)."""
    data = data_file(path)
    data.unlink(missing_ok=True)  # never append to, or leave behind, an earlier graph's weights
    if sum(t.ByteSize() for t in model.graph.initializer) <= INLINE_LIMIT:
        write_atomic(path, lambda tmp: onnx.save(model, str(tmp)))
        return

    def write(tmp: Path) -> None:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        os.chmod(data, 0o666 & ~umask())  # as write_atomic leaves the graph file

    try:
        write_atomic(path, write)
    except BaseException:
        data.unlink(missing_ok=True)
        raise


STACK_TRACE = "pkg.torch.onnx.stack_trace"  # per node: the Python frames that made it, with absolute file paths


def drop_stack_traces(model: onnx.ModelProto) -> None:
    """Remove the exporter's per-node Python stack traces (in place). They hold the absolute source paths and line
    numbers of the machine that exported, so a graph's bytes depended on where the tool was installed (the same
    model exported from two checkouts differed), and they were about 6% of a graph file. The node's module path
    (`namespace`, `pkg.torch.onnx.name_scopes`) stays."""
    for graph_nodes in (model.graph.node, *(f.node for f in model.functions)):
        for node in graph_nodes:
            kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(kept)


def drop_noop_squeezes(model: onnx.ModelProto) -> None:
    """torch's squeeze(dim) of a dimension that is not 1 is a no-op, but the exporter emits an ONNX
    Squeeze, which refuses it (e.g. PixArt's output tokens): make those Identity (in place)."""
    shapes = {v.name: v.type.tensor_type.shape for v in [*model.graph.value_info, *model.graph.input]}
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    constants |= {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
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


def conv1d_as_conv2d(model: onnx.ModelProto) -> None:
    """Each 1-D Conv with its weight as an initializer becomes Unsqueeze -> 2-D Conv over a height of 1 ->
    Squeeze (in place; the same outputs, the weight's bytes unchanged). ONNX Runtime's CPU Conv runs 1-D
    convolutions on its generic path and 2-D ones on its blocked (NCHWc) kernels: measured on the PushT policy
    UNet (BENCHMARKS.md), about 1.5x faster at batch 1 and 2x at batch 100."""
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {v.name: 2 for v in [*graph.input, *graph.output]}  # a weight seen outside: kept
    for node in _nodes(graph):
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    axis = "conv1d_as_conv2d.axis"
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 3 or uses[weight.name] != 1:
            nodes.append(node)
            continue
        weight.dims.insert(2, 1)
        for attr in node.attribute:
            if attr.name in ("kernel_shape", "strides", "dilations"):
                attr.ints[:] = [1, *attr.ints]
            elif attr.name == "pads":
                attr.ints[:] = [0, attr.ints[0], 0, attr.ints[1]]
        source, result = node.input[0], node.output[0]
        node.input[0], node.output[0] = f"{source}.as_2d.{result}", f"{result}.as_2d"
        unsqueeze = onnx.helper.make_node("Unsqueeze", [source, axis], [node.input[0]])
        squeeze = onnx.helper.make_node("Squeeze", [node.output[0], axis], [result])
        nodes += [unsqueeze, node, squeeze]
    if len(nodes) != len(graph.node):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), axis))
        del graph.node[:]
        graph.node.extend(nodes)


def _nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of `graph` and of the subgraphs its nodes hold (If branches, Loop bodies)."""
    found = []
    for node in graph.node:
        found.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                found += _nodes(sub)
    return found


def check_graph_file(path: Path) -> None:
    """check_graph for a written graph, its weights inline or in `<file>.data` (any size)."""
    onnx.checker.check_model(str(path))
    _refuse_random_ops(onnx.load(str(path), load_external_data=False))


def check_graph(model: onnx.ModelProto) -> None:
    """Shipping a graph that samples its own noise would break seed-for-seed verification."""
    onnx.checker.check_model(model)
    _refuse_random_ops(model)


def _refuse_random_ops(model: onnx.ModelProto) -> None:
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    if found := sorted(ops & RANDOM_OPS):
        raise ExportError(f"exported graph contains random ops {found}; export the model in eval mode")
