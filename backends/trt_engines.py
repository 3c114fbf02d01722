"""TensorRT engines from our ONNX graphs, and a runner executing plan.json on them (GPU only).

Imported only where `tensorrt.unavailable()` is None: TensorRT and a CUDA GPU. Follows the TensorRT 10
Python API as NVIDIA's demo/Diffusion uses it: a strongly typed network (no precision flags: the ONNX types
and Q/DQ nodes decide INT8 / FP8 / INT4), one optimization profile over the batch (1, 2, max_batch; the
sample and condition shapes are the graph's), and a timing cache shared by the graphs of one artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tensorrt as trt
import torch

from core.errors import ExportError, LoadError
from core.fileio import recorded_file, write_bytes
from core.outputs import PLAN_FILE

from .plan import read_plan, recorded_files
from .runner import LoopGraph, PlanRunner
from .trt_files import EngineError, engine_path

LOGGER = trt.Logger(trt.Logger.WARNING)
TORCH_TYPES = {
    trt.float32: torch.float32,
    trt.float16: torch.float16,
    trt.bfloat16: torch.bfloat16,
    trt.int32: torch.int32,
    trt.int64: torch.int64,
    trt.bool: torch.bool,
}


def build_engine(onnx_path: Path, path: Path, timing_cache: Path, max_batch: int) -> Path:
    """Parse `onnx_path` into a strongly typed network, build and write the serialized engine to `path`."""
    builder = trt.Builder(LOGGER)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, LOGGER)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 layers would compute in TF32
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU is ignored, not fatal
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        first, *rest = tuple(tensor.shape)
        if any(d < 0 for d in rest):
            raise ExportError(f"{onnx_path.name}: input '{tensor.name}' has a dynamic dimension besides the batch")
        low, opt, high = (1, 2, max_batch) if first < 0 else (first, first, first)
        profile.set_shape(tensor.name, (low, *rest), (opt, *rest), (high, *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    write_bytes(path, bytes(serialized))
    write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return path


class EngineGraph(LoopGraph):
    """One engine as a loop graph (see LoopGraph): torch tensors in and out, run on the GPU."""

    def __init__(self, path: Path, condition_names: tuple[str, ...], order: list[str]) -> None:
        """`order`: the ONNX graph's input and output names (plan.json), which the engine's follow."""
        runtime = trt.Runtime(LOGGER)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise LoadError(f"{path}: not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        if set(names) != set(order):
            raise LoadError(f"{path}: the engine's inputs/outputs {names} are not its graph's {order}")
        inputs = [n for n in order if is_input[n]]
        super().__init__(inputs, [n for n in order if not is_input[n]], condition_names)
        self.max_batch = min(self.engine.get_tensor_profile_shape(n, 0)[2][0] for n in self.input_names)
        self.stream = torch.cuda.Stream()  # not the legacy default stream (extra synchronizations)

    def describe(self) -> dict[str, Any]:
        return {"device": torch.cuda.get_device_name(), "engine_io": self.input_names + self.output_names}

    def run(self, feeds: dict[str, torch.Tensor], outputs: list[str]) -> list[torch.Tensor]:
        """Every output is computed; batches over the profile's largest run in chunks of it."""
        batch = len(feeds["sample"])
        chunks = [
            self._run_chunk({n: feeds[n][i : i + self.max_batch] for n in self.input_names})
            for i in range(0, batch, self.max_batch)
        ]
        return [torch.cat(parts) for parts in zip(*chunks, strict=True)][: len(outputs)]

    def _run_chunk(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        with torch.cuda.stream(self.stream):
            inputs = {n: feeds[n].to("cuda", TORCH_TYPES[self.engine.get_tensor_dtype(n)]).contiguous() for n in feeds}
            for name, tensor in inputs.items():  # `inputs` keeps them alive until the stream is synchronized
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise EngineError(f"TensorRT refused input '{name}' of shape {tuple(tensor.shape)}")
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = []
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=TORCH_TYPES[self.engine.get_tensor_dtype(name)], device="cuda")
                self.context.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError("TensorRT execution failed")
            self.stream.synchronize()
        # The model output goes to the loop (float32, on the host); carried tensors (a cache's stored features)
        # stay on the GPU, where the next step's engine reads them without a round trip.
        first = outputs[0].float().cpu() if outputs[0].is_floating_point() else outputs[0].cpu()
        return [first, *outputs[1:]]


def open_engine_runner(folder: Path, describe: dict[str, Any]) -> PlanRunner:
    """The plan's denoiser graphs on their engines; pipeline stages (text encoder, decoder) stay in ORT."""
    from .ort import OrtDenoiser

    plan = read_plan(Path(folder), files=False)  # PlanRunner checks the graph files (sha256)
    recorded = {plan.graph_path(name): graph for name, graph in plan.document["graphs"].items()}

    files = recorded_files(plan.document, str(plan.folder / PLAN_FILE))

    def open_graph(path: Path, condition_names: tuple[str, ...]) -> EngineGraph:
        order = [*recorded[path]["inputs"], *recorded[path]["outputs"]]
        name = engine_path(path).name  # deserializing runs the engine's code: only the engine we built
        engine = recorded_file(plan.folder, name, files.get(name), f"{plan.folder / PLAN_FILE}: engine")
        return EngineGraph(engine, condition_names, order)

    def open_stage(path: Path):
        return OrtDenoiser(path, ("CUDAExecutionProvider", "CPUExecutionProvider"), 0, ()).session_fn()

    return PlanRunner(plan.folder, open_graph, {**describe, "executed_by": "tensorrt"}, open_stage)
