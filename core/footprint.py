"""A denoiser's footprint from its config alone: built on torch's `meta` device, which allocates nothing, and
run once at batch 1 on meta tensors, for the exact parameter count and the largest activation of one call
(attention scores included). Above the adapters, which build the model; core.limits holds the bounds."""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from core.adapters import adapter_for
from core.errors import LoadError, one_line
from core.limits import Footprint


def footprint(model_class: str, config: dict[str, Any]) -> Footprint:
    """Exact parameter count and largest activation, without allocating: build and run on `meta`."""
    return _footprint(model_class, json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _footprint(model_class: str, config_json: str) -> Footprint:
    adapter = adapter_for(model_class)
    config = json.loads(config_json)
    largest = 0

    def record(module: Any, args: tuple, output: Any) -> None:
        nonlocal largest
        for out in output if isinstance(output, tuple) else (output,):
            if isinstance(out, torch.Tensor):
                largest = max(largest, out.numel())
        if isinstance(module, Attention) and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            tokens = x.shape[1] if x.dim() == 3 else x[0, 0].numel()
            largest = max(largest, x.shape[0] * module.heads * tokens * tokens)  # softmax(QK^T) per head

    try:
        with torch.device("meta"):
            model = adapter.build(config).eval()
        shape = adapter.sample_shape(config)
        hooks = [m.register_forward_hook(record) for m in model.modules()]
        x = torch.zeros(1, *shape, device="meta")
        t = torch.zeros(1, device="meta")
        with torch.no_grad():
            adapter.forward(model, x, t, adapter.probe_conditions(config, "meta"))
        for hook in hooks:
            hook.remove()
    except LoadError:
        raise
    except Exception as exc:  # diffusers raises many types for an inconsistent config
        raise LoadError(f"invalid {model_class} config: {one_line(str(exc), 300)}") from None
    return Footprint(sum(p.numel() for p in model.parameters()), largest)
