"""Triton Python-backend model: the whole plan of an `optimize` output (scheduler, guidance, graph
variants with their cache carry-over, decoder) as `optimize sample` runs it, each graph a BLS call to its
own model in the repository. Requests (one image each, batched by Triton's dynamic batcher) carry a seed
and a class label or a prompt; responses carry the image (uint8, HWC) and the final latents."""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from backends.runner import LoopGraph, PlanRunner
from core.limits import MAX_SEED
from core.pixels import to_pixels
from core.stages import MAX_PROMPT_CHARS


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


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"] / "artifact"
        self.models = json.loads((folder / "models.json").read_text())  # graph file -> model name
        plan = json.loads((folder / "plan.json").read_text())
        recorded = {**plan["graphs"], **plan.get("stages", {})}

        def io(path):
            entry = next(g for g in recorded.values() if g["file"] == path.name)
            return entry["inputs"], entry["outputs"]

        def open_graph(path, condition_names):
            return BlsGraph(self.models[path.name], *io(path), condition_names)

        def open_stage(path):
            return bls_stage(self.models[path.name], io(path)[1])

        self.runner = PlanRunner(folder, open_graph, {"name": "triton"}, open_stage, files=False)
        self.conditioning = self.runner.plan.conditioning

    def _condition(self, request):
        if self.conditioning.text:
            prompt = pb_utils.get_input_tensor_by_name(request, "prompt")
            if prompt is None:
                raise ValueError("this pipeline is text-conditioned: send 'prompt'")
            values = prompt.as_numpy().reshape(-1)
            if values.size != 1 or len(values[0]) > MAX_PROMPT_CHARS:
                raise ValueError(f"one prompt per request, at most {MAX_PROMPT_CHARS} bytes")
            text = values[0].decode("utf-8")
            stages = self.runner.stages
            stages.adapter.tokenize(stages.stages, [text])  # refuses a prompt over the encoder's token limit
            return text
        if self.conditioning.num_classes:
            label = pb_utils.get_input_tensor_by_name(request, "class_label")
            value = 0 if label is None else int(label.as_numpy().reshape(-1)[0])
            if not 0 <= value < self.conditioning.num_classes:
                raise ValueError(f"class_label {value} outside 0..{self.conditioning.num_classes - 1}")
            return value
        return None

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                seed = pb_utils.get_input_tensor_by_name(request, "seed").as_numpy().reshape(-1)
                if seed.size != 1 or not 0 <= int(seed[0]) < MAX_SEED:
                    raise ValueError(f"one seed per request, in 0..{MAX_SEED - 1}")
                parsed.append((i, int(seed[0]), self._condition(request)))
            except Exception as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500]))
        if parsed:
            try:
                conditions = [c for _, _, c in parsed]
                final = self.runner.sample([s for _, s, _ in parsed], None if conditions[0] is None else conditions)
                images = to_pixels(self.runner.decode(final))
                for k, (i, _, _) in enumerate(parsed):
                    tensors = [
                        pb_utils.Tensor("image", images[k : k + 1]),
                        pb_utils.Tensor("latents", final[k : k + 1].numpy().astype(np.float32)),
                    ]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:
                for i, _, _ in parsed:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500]))
        return responses
