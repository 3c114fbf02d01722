"""Lint an ONNX graph for TensorRT's ONNX parser without TensorRT: what can be checked on a CPU machine.

The rules are the parser's documented support for the declared version (onnx-tensorrt `docs/operators.md`
at TensorRT 10.1 GA, 2024-06-17) and TensorRT's explicit quantization (developer guide, "Working with
quantized types"): supported operators and opset range; Q/DQ types INT8, FP8 E4M3 and INT4 only (UINT8 is
a network input/output type only), zero points of 0, INT4 for weights only, and every activation
DequantizeLinear fed by a QuantizeLinear (Q/DQ pairs mark where TensorRT may run a layer in low precision).
A clean lint is no engine: only a build on the GPU proves the graph (backends/trt.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TENSORRT_VERSION = "10.1"
OPSET_RANGE = (9, 20)  # documented for the 10.x parser; ONNX defines INT4 Q/DQ from opset 21 (see _check_opset)

# Operators the 10.1 parser supports ("Y" in its support matrix); random ops are listed there but our
# exporter refuses them (seeded sampling happens outside the graph).
_PARSER_OPS = """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
    IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
    OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
    Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
    Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor"""
SUPPORTED_OPS = frozenset(_PARSER_OPS.split())
QUANTIZED_TYPES = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FP8 E4M3", TensorProto.INT4: "INT4"}
# Element types TensorRT has no tensors of (UINT8 only at the network's inputs and outputs).
UNSUPPORTED_TYPES = frozenset(
    {TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.INT16, TensorProto.STRING}
    | {TensorProto.COMPLEX64, TensorProto.COMPLEX128, TensorProto.UINT4, TensorProto.FLOAT8E5M2}
)


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "error": the parser or builder refuses it; "warning": it may work, check on the GPU
    node: str
    message: str


def lint_model(model: onnx.ModelProto) -> dict[str, Any]:
    """Every finding on `model` (weights need not be loaded: types come from the graph), with counts."""
    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    constants |= {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    findings = [*_check_opset(model), *_check_io_types(graph)]
    for node in graph.node:
        findings += _check_node(node, constants, consumers, producers)
    counts = Counter(f.severity for f in findings)
    quantized = Counter(
        _type_name(_quantized_type(n, constants)) for n in graph.node if n.op_type == "DequantizeLinear"
    )
    return {
        "tensorrt_version": TENSORRT_VERSION,
        "nodes": len(graph.node),
        "op_types": sorted({n.op_type for n in graph.node}),
        "dequantize_nodes": dict(quantized),
        "errors": counts["error"],
        "warnings": counts["warning"],
        "findings": [asdict(f) for f in findings],
    }


def lint_file(path: Any) -> dict[str, Any]:
    return lint_model(onnx.load(str(path), load_external_data=False))


def _type_name(elem: int) -> str:
    return QUANTIZED_TYPES.get(elem) or (TensorProto.DataType.Name(elem) if elem else "from its Q")


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_opset(model: onnx.ModelProto) -> list[Finding]:
    version, (low, high) = _opset(model), OPSET_RANGE
    if version < low:
        return [Finding("opset", "error", "", f"opset {version} is below TensorRT's range {low}-{high}")]
    if version > high:
        return [
            Finding(
                "opset",
                "warning",
                "",
                f"opset {version} is above the range documented for TensorRT {TENSORRT_VERSION}'s parser "
                f"({low}-{high}); INT4 Q/DQ need opset 21: use a TensorRT release that parses it",
            )
        ]
    return []


def _check_io_types(graph: onnx.GraphProto) -> list[Finding]:
    found = []
    for value in [*graph.input, *graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem in UNSUPPORTED_TYPES:
            name = TensorProto.DataType.Name(elem)
            found.append(Finding("dtype", "error", value.name, f"input/output '{value.name}' is {name}"))
        elif elem == TensorProto.DOUBLE:
            found.append(Finding("dtype", "warning", value.name, f"'{value.name}' is DOUBLE: cast down to FLOAT"))
    return found


def _quantized_type(node: onnx.NodeProto, constants: dict[str, TensorProto]) -> int:
    """The element type a Q produces / a DQ reads: the zero point's type, else the DQ input's, else UINT8."""
    if len(node.input) > 2 and node.input[2] in constants:
        return constants[node.input[2]].data_type
    if node.op_type == "DequantizeLinear" and node.input[0] in constants:
        return constants[node.input[0]].data_type
    if node.op_type == "QuantizeLinear":
        attr = next((a for a in node.attribute if a.name == "output_dtype"), None)  # opset 21
        return attr.i if attr is not None and attr.i else TensorProto.UINT8  # ONNX's default without a zero point
    return 0  # an activation DQ without a zero point: its Q decides


def _check_node(
    node: onnx.NodeProto,
    constants: dict[str, TensorProto],
    consumers: dict[str, list[onnx.NodeProto]],
    producers: dict[str, onnx.NodeProto],
) -> list[Finding]:
    where = node.name or node.output[0]
    if node.domain not in ("", "ai.onnx"):
        return [Finding("domain", "error", where, f"{node.domain}::{node.op_type} needs a TensorRT plugin")]
    if node.op_type not in SUPPORTED_OPS:
        return [Finding("op", "error", where, f"{node.op_type} is not supported by TensorRT {TENSORRT_VERSION}")]
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return []
    found = []
    elem = _quantized_type(node, constants)
    if elem and elem not in QUANTIZED_TYPES:
        name = TensorProto.DataType.Name(elem)
        uint8 = elem == TensorProto.UINT8
        hint = " (UINT8 is a network input/output type only: quantize activations to INT8)" if uint8 else ""
        found.append(Finding("qdq-type", "error", where, f"{node.op_type} of {name}{hint}"))
    zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
    if zero_point is not None and np.any(numpy_helper.to_array(zero_point).astype(np.float32) != 0):
        found.append(Finding("qdq-zero-point", "error", where, "zero point is not 0 (symmetric only)"))
    if node.op_type == "QuantizeLinear":
        if elem == TensorProto.INT4:
            found.append(Finding("int4-activations", "error", where, "INT4 is for weights only (weight-only DQ)"))
        others = [c.op_type for c in consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
        if others:
            found.append(Finding("qdq-pair", "error", where, f"QuantizeLinear feeds {others[0]}, not a DQ"))
    elif node.input[0] not in constants:
        producer = producers.get(node.input[0])
        if producer is None or producer.op_type != "QuantizeLinear":
            found.append(Finding("qdq-pair", "error", where, "activation DequantizeLinear without a QuantizeLinear"))
    return found
