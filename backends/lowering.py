"""Lower a program to ONNX: one graph per variant its plan runs (core.variants), then plan.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.ir import DENOISER, DiffusionProgram
from core.loading import fp32_copy
from core.quantized import quantized_layers
from core.variants import example_carry, graph_variants

from .onnx_export import OUTPUT_NAME, example_inputs, export_onnx, input_names
from .pipeline_stages import lower_stages
from .plan import GraphFile, graph_bytes, graph_files, plan_document, write_plan

ONNX_FILE = "denoiser.onnx"


def graph_file(variant: str) -> str:
    return ONNX_FILE if variant == DENOISER else f"denoiser_{variant}.onnx"


def lower_onnx(program: DiffusionProgram, folder: Path, backend: dict[str, Any]) -> dict[str, Any]:
    """Export every graph variant the plan runs into `folder`, then plan.json saying which runs at each
    step and which `backend` executes them. Returns what was written."""
    from .qdq import export_quantized

    # Graphs are exported from float32 modules whatever the program's --dtype: ONNX Runtime's CPU provider
    # has no bfloat16 kernels (plan.json still names the program as placed: its fingerprint).
    exported = fp32_copy(program)
    spec = program.spec
    variants = graph_variants(exported)
    carry = example_carry(variants, *example_inputs(spec))
    export = export_quantized if quantized_layers(exported.denoiser) else export_onnx
    graphs = {}
    for name, variant in variants.items():
        carried = {n: carry[n] for n in variant.carried_in}
        path = folder / graph_file(name)
        export(variant.module, spec, path, carried_in=carried, carried_out=variant.carried_out)
        graphs[name] = GraphFile(path, [*input_names(spec), *carried], [OUTPUT_NAME, *variant.carried_out])
    stages = lower_stages(exported, folder, graph_files)
    write_plan(folder, plan_document(program, graphs, backend, stages))
    stage_files = [s["file"] for s in stages.values()]
    return {
        "onnx": [g.path.name for g in graphs.values()],
        "onnx_bytes": sum(graph_bytes(g.path) for g in graphs.values()),
        "stages": stage_files,
        "stage_bytes": sum(graph_bytes(folder / f) for f in stage_files),
        "plan": "plan.json",
    }
