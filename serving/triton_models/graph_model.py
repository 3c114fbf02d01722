"""Triton Python-backend model: one ONNX graph of the artifact run by ONNX Runtime (the CPU test
configuration: the server binary at hand has no onnxruntime backend). Inputs and outputs are the graph's."""

from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
                values = self.session.run(None, feeds)
                tensors = [pb_utils.Tensor(n, v) for n, v in zip(self.outputs, values, strict=True)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # a bad request fails alone; the model stays up
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500])))
        return responses
