"""Write a quantized program's numbers into an exported fp32 graph as Q/DQ (explicit quantization).

For every QuantizedLayer the weight initializer is replaced by its quantized values (int8, float8 E4M3 or
blocked int4) plus a DequantizeLinear, and the layer's input gets a QuantizeLinear/DequantizeLinear pair with
the calibrated scale (uint8 with zero point, int8, or float8). This is the form ONNX Runtime fuses into
integer kernels on CPU (uint8 activations x int8 weights) and TensorRT consumes as explicit quantization.
Graph nodes are matched to layers by the exporter's module scopes, and each weight is checked against the
layer's own before it is replaced.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from core.errors import ExportError
from core.ir import ModelSpec
from core.quantized import QuantizedLayer, export_mode, quantized_layers

from .onnx_export import check_graph_file, export_onnx, save_model

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
ACT_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


def required_opset(layers: Mapping[str, QuantizedLayer]) -> int:
    """Blocked int4 DequantizeLinear needs opset 21; float8 Q/DQ needs 19."""
    kinds = {q.fmt.weights for q in layers.values()} | {q.fmt.activations for q in layers.values()}
    if "nvfp4" in kinds:
        raise ExportError(
            "NVFP4 has no ONNX Runtime kernels (FLOAT4E2M1 Q/DQ runs in TensorRT on Blackwell only); "
            "NVFP4 is measured in torch emulation (`optimize bench quant`), not lowered"
        )
    return 21 if "int4" in kinds else 19 if "fp8" in kinds else 18


def insert_qdq(
    model: onnx.ModelProto,
    layers: Mapping[str, QuantizedLayer],
    scopes: Mapping[str, str],
    allow_missing: bool = False,
) -> int:
    """Rewrite `model` in place; returns the number of layers quantized. `scopes`: the exported module's
    path of each quantized layer -> the layer's name. Every layer must be found unless `allow_missing`."""
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, int] = {}  # layer -> node index
    for index, node in enumerate(model.graph.node):
        if node.op_type in LINEAR_OPS and len(node.input) > 1 and node.input[1] in inits:
            layer = _layer_of(node, scopes)
            if layer is not None:
                if layer in found:
                    raise ExportError(f"layer '{layer}' maps to more than one graph node")
                found[layer] = index
    missing = sorted(set(layers) - set(found))
    if missing and not allow_missing:
        raise ExportError(f"quantized layers not found in the exported graph: {missing[:5]}")
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # inserted before the node at that index
    after_nodes: dict[int, list[onnx.NodeProto]] = {}  # inserted after it
    act_outputs: dict[tuple, str] = {}
    for name, index in found.items():
        node, layer = model.graph.node[index], layers[name]
        before = new_nodes.setdefault(index, [])
        node.input[1] = _quantize_weight(model, inits[node.input[1]], node, layer, name, before)
        if layer.fmt.activations != "none":
            key = (node.input[0], layer.fmt.activations, layer.act_scale, layer.act_zero_point)
            if key not in act_outputs:
                act_outputs[key] = _quantize_activation(model, node.input[0], layer, name, before)
            node.input[0] = act_outputs[key]
        if layer.out_range is not None:
            after_nodes[index] = _quantize_output(model, node, layer, name)
    nodes = []
    for index, node in enumerate(model.graph.node):
        nodes.extend(new_nodes.get(index, []))
        nodes.append(node)
        nodes.extend(after_nodes.get(index, []))
    del model.graph.node[:]
    model.graph.node.extend(_topological(nodes, model))
    return len(found)


def export_quantized(
    denoiser: torch.nn.Module,
    spec: ModelSpec,
    path: Path,
    carried_in: Mapping[str, torch.Tensor] | None = None,
    carried_out: Sequence[str] = (),
) -> Path:
    """Export `denoiser` (a module whose `.model` holds QuantizedLayers) as a Q/DQ graph, written atomically.
    A cached variant (`carried_in`) skips some layers, so only the layers it runs must be found."""
    layers = quantized_layers(denoiser.model)
    opset = required_opset(layers)
    # A layer runs under whichever path the exported module reaches it by (a cache variant's shell and
    # wrappers), so graph scopes are matched by module identity, not by a fixed prefix.
    names = {id(module): name for name, module in denoiser.model.named_modules() if name in layers}
    scopes = {path: names[id(m)] for path, m in denoiser.named_modules(remove_duplicate=False) if id(m) in names}
    with export_mode(denoiser):
        export_onnx(denoiser, spec, path, opset=opset, carried_in=carried_in, carried_out=carried_out)
    model = onnx.load(str(path))  # with its weights, wherever they are
    insert_qdq(model, layers, scopes, allow_missing=bool(carried_in))
    save_model(model, path)
    check_graph_file(path)
    return path


def _layer_of(node: onnx.NodeProto, scopes: Mapping[str, str]) -> str | None:
    """The quantized layer whose inner module (`<layer path>.inner`) the node was exported in."""
    meta = {p.key: p.value for p in node.metadata_props}
    for scope in reversed(ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))):
        if scope.endswith(".inner"):
            return scopes.get(module_path(scope.removesuffix(".inner")))
    return None


_SLICE = re.compile(r"\.slice\((\d+|None), (\d+|None), (\d+|None)\)\.(\d+)")


def module_path(scope: str) -> str:
    """An exporter scope as the module's path: a layer reached through a sliced ModuleList
    (`resnets.slice(1, None, None).0`, as diffusers' UNet mid block iterates `self.resnets[1:]`) is
    `resnets.1`."""

    def index(m: re.Match) -> str:
        start, step = int(m[1]) if m[1] != "None" else 0, int(m[3]) if m[3] != "None" else 1
        return f".{start + step * int(m[4])}"

    return _SLICE.sub(index, scope)


def _layout(node: onnx.NodeProto) -> str:
    """'in_out' when the graph holds the weight transposed ([in, out]), else 'out_in' (torch's layout)."""
    if node.op_type == "MatMul":
        return "in_out"
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return "out_in" if trans_b else "in_out"
    return "out_in"


def _quantize_weight(
    model: onnx.ModelProto,
    init: onnx.TensorProto,
    node: onnx.NodeProto,
    layer: QuantizedLayer,
    name: str,
    before: list[onnx.NodeProto],
) -> str:
    graph_w = numpy_helper.to_array(init)
    layout = _layout(node)
    w = layer.inner.weight.detach().numpy()
    as_torch = graph_w.T if layout == "in_out" else graph_w
    # A 1-D convolution the export wrote as 2-D (onnx_export.conv1d_as_conv2d): [out, in, 1, k] for [out, in, k].
    as_2d = node.op_type == "Conv" and w.ndim == 3 and as_torch.shape == (*w.shape[:2], 1, w.shape[2])
    if as_2d:
        as_torch = as_torch.reshape(w.shape)
    if as_torch.shape != w.shape or not np.allclose(as_torch, w, rtol=1e-5, atol=1e-6):
        raise ExportError(f"graph weight '{init.name}' does not match layer '{name}'")
    fmt, scales = layer.fmt, layer.weight_scales.detach()
    wt = layer.inner.weight.detach()
    base = f"{name}.weight"
    attrs: dict[str, int] = {}
    if fmt.weights in ("int8", "fp8"):
        shaped = scales.reshape(-1, *([1] * (wt.dim() - 1)))
        if fmt.weights == "int8":
            top = 2 ** (fmt.weight_bits - 1)
            q = torch.clamp(torch.round(wt / shaped), -top, top - 1).to(torch.int8).numpy()
            tensor = numpy_helper.from_array(q.T if layout == "in_out" else q, f"{base}_quantized")
            zero = numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{base}_zero_point")
        else:
            q = (wt / shaped).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            q = q.T if layout == "in_out" else q
            tensor = _raw(f"{base}_quantized", TensorProto.FLOAT8E4M3FN, q)
            zero = _raw(f"{base}_zero_point", TensorProto.FLOAT8E4M3FN, np.zeros(len(scales), np.uint8))
        scale = scales.numpy().astype(np.float32)
        attrs["axis"] = 1 if layout == "in_out" else 0
    else:  # int4, blocks along the input dimension
        expanded = scales.repeat_interleave(fmt.block, dim=1)
        q = torch.clamp(torch.round(wt / expanded), -8, 7).to(torch.int8).numpy()
        q, scale = (q.T, scales.numpy().T) if layout == "in_out" else (q, scales.numpy())
        tensor = _raw(f"{base}_quantized", TensorProto.INT4, _pack_int4(q), q.shape)
        zero = None
        scale = np.ascontiguousarray(scale, np.float32)
        attrs.update(axis=0 if layout == "in_out" else 1, block_size=fmt.block)
    if as_2d:  # the same values in the graph's 2-D form (per-channel scales along axis 0 keep their shape; block
        tensor.dims.insert(2, 1)  # formats quantize Linear layers only, core.quantized)
    model.graph.initializer.remove(init)
    model.graph.initializer.extend([tensor, numpy_helper.from_array(scale, f"{base}_scale")])
    inputs = [tensor.name, f"{base}_scale"]
    if zero is not None:
        model.graph.initializer.append(zero)
        inputs.append(zero.name)
    out = f"{base}_dequantized"
    before.append(helper.make_node("DequantizeLinear", inputs, [out], name=f"{base}_DequantizeLinear", **attrs))
    return out


def _quantize_activation(
    model: onnx.ModelProto, tensor: str, layer: QuantizedLayer, name: str, before: list[onnx.NodeProto]
) -> str:
    base = f"{name}.input"
    kind = layer.fmt.activations
    scale = numpy_helper.from_array(np.array(layer.act_scale, np.float32), f"{base}_scale")
    if kind == "fp8":
        zero = _raw(f"{base}_zero_point", TensorProto.FLOAT8E4M3FN, np.zeros((), np.uint8))
    else:
        dtype = np.uint8 if kind == "uint8" else np.int8
        zero = numpy_helper.from_array(np.array(layer.act_zero_point, dtype), f"{base}_zero_point")
    model.graph.initializer.extend([scale, zero])
    q, dq = f"{base}_quantized", f"{base}_dequantized"
    names = [scale.name, zero.name]
    before.append(helper.make_node("QuantizeLinear", [tensor, *names], [q], name=f"{base}_QuantizeLinear"))
    before.append(helper.make_node("DequantizeLinear", [q, *names], [dq], name=f"{base}_DequantizeLinear"))
    return dq


def _quantize_output(model: onnx.ModelProto, node: onnx.NodeProto, layer: QuantizedLayer, name: str) -> list:
    """Conv -> Q -> DQ on the output, under the output's original name (consumers stay untouched)."""
    base, final = f"{name}.output", node.output[0]
    node.output[0] = f"{base}_float"
    scale = numpy_helper.from_array(np.array(layer.out_scale, np.float32), f"{base}_scale")
    zero = numpy_helper.from_array(np.array(layer.out_zero_point, np.uint8), f"{base}_zero_point")
    model.graph.initializer.extend([scale, zero])
    names = [scale.name, zero.name]
    return [
        helper.make_node("QuantizeLinear", [node.output[0], *names], [f"{base}_quantized"], name=f"{base}_Quantize"),
        helper.make_node("DequantizeLinear", [f"{base}_quantized", *names], [final], name=f"{base}_Dequantize"),
    ]


def _raw(name: str, dtype: int, data: np.ndarray, shape: tuple[int, ...] | None = None) -> onnx.TensorProto:
    return helper.make_tensor(name, dtype, data.shape if shape is None else shape, data.tobytes(), raw=True)


def _pack_int4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte, the first in the low nibble (ONNX's INT4 layout)."""
    nibbles = (q.astype(np.int8).flatten() & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _topological(nodes: list[onnx.NodeProto], model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Inserted nodes sit right before their consumer; shared activation Q/DQ must precede every consumer."""
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    ordered, pending = [], list(nodes)
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError("the quantized graph has a cycle or a dangling input")
        pending = rest
    return ordered
