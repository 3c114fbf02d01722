"""Triton Python-backend model: the whole plan of an `optimize` output (scheduler, guidance, graph
variants with their cache carry-over, decoder) as `optimize sample` runs it, each graph a BLS call to its
own model in the repository. Requests (one image each, batched by Triton's dynamic batcher) carry a seed
and a class label or a prompt; responses carry the image (uint8, HWC) and the final latents."""

import numpy as np
import triton_python_backend_utils as pb_utils

from core.limits import MAX_SEED
from core.pixels import to_pixels
from core.stages import MAX_PROMPT_CHARS
from serving.triton_models.bls import artifact_runner


class TritonPythonModel:
    def initialize(self, args):
        self.runner = artifact_runner(args)
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
