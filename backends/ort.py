"""ONNX Runtime execution of an exported denoiser, callable like the torch one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OrtDenoiser:
    def __init__(self, path: Path, providers: tuple[str, ...] = DEFAULT_PROVIDERS, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or list(DEFAULT_PROVIDERS)
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        feeds = {"sample": x.numpy().astype(np.float32), "timestep": t.numpy().astype(np.float32)}
        if "class_labels" in self.input_names:
            feeds["class_labels"] = y.numpy().astype(np.int64)
        return torch.from_numpy(self.session.run(None, feeds)[0])
