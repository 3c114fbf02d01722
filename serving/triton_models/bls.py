"""BLS calls from a Triton Python-backend model to the graph models of its repository: a graph model as a
loop graph (backends.runner.LoopGraph), a stage graph as a callable, and the artifact's runner over them."""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from backends.runner import LoopGraph, PlanRunner


def bls_call(model, feeds, outputs):
    """One BLS request to `model`: {input name: array} -> [arrays of `outputs`]."""
    tensors = [pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in feeds.items()]
    response = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=tensors).exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]


class BlsGraph(LoopGraph):
    """A graph model of the repository as a loop graph."""

    def __init__(self, model: str, inputs: list[str], outputs: list[str], condition_names: tuple[str, ...]):
        super().__init__(inputs, outputs, condition_names)
        self.model = model

    def describe(self):
        return {"model": self.model}

    def run(self, feeds, outputs):
        values = bls_call(self.model, {n: v.numpy() for n, v in feeds.items()}, outputs)
        return [torch.from_numpy(v.copy()) for v in values]


def bls_stage(model: str, outputs: list[str]):
    """A stage graph (prompt encoder, decoder) as {input name: array} -> [output arrays]."""
    return lambda feeds: bls_call(model, feeds, outputs)


def artifact_runner(args) -> PlanRunner:
    """The runner of the artifact copied into the calling model's version folder, its graphs reached by BLS
    (`models.json`: graph file -> model name)."""
    folder = Path(args["model_repository"]) / args["model_version"] / "artifact"
    models = json.loads((folder / "models.json").read_text())
    plan = json.loads((folder / "plan.json").read_text())
    recorded = {**plan["graphs"], **plan.get("stages", {})}

    def io(path):
        entry = next(g for g in recorded.values() if g["file"] == path.name)
        return entry["inputs"], entry["outputs"]

    def open_graph(path, condition_names):
        return BlsGraph(models[path.name], *io(path), condition_names)

    def open_stage(path):
        return bls_stage(models[path.name], io(path)[1])

    return PlanRunner(folder, open_graph, {"name": "triton"}, open_stage, files=False)
