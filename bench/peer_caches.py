"""diffusers' own cache hooks around our denoisers, for side-by-side comparison with the cache pass.

FirstBlockCache (dynamic, per call: skip the remaining blocks when the first block's residual barely
moved), PyramidAttentionBroadcast (reuse attention outputs every k-th call inside a timestep range)
and FasterCache (reuse attention outputs and, on skipped steps, estimate the unconditional output
from the conditional one in frequency space). The hooks are stateful and run in torch only; they
cannot be lowered to a static graph, which is what the cache pass's schedule is for.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from core.adapters import adapter_for
from core.errors import ConfigError
from core.ir import DiffusionProgram

METHODS = ("first-block-cache", "pyramid-attention-broadcast", "faster-cache")
FIRST_BLOCK_CACHE_MODEL = "DiTTransformer2DModel"  # the one of our families FirstBlockCache runs on unchanged


@dataclass(frozen=True)
class PeerCache:
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"diffusers {self.method}" + (f" ({shown})" if shown else "")

    def applies(self, model_class: str) -> bool:
        """FirstBlockCache needs a transformer whose blocks diffusers' TransformerBlockRegistry knows (DiT's
        BasicTransformerBlock stack, called with `hidden_states`); the attention hooks need diffusers Attention."""
        return self.method != "first-block-cache" or model_class == FIRST_BLOCK_CACHE_MODEL


class HookedDenoiser:
    """A copy of the program's denoiser with one diffusers cache hook applied, called as a DenoiseFn.

    Our loop batches a guided step as [cond, uncond]; diffusers pipelines (and FasterCache, which
    splits the batch in halves) use [uncond, cond], so the halves are swapped around the call.
    `reset()` clears the hooks' state; call it before each new sampling run."""

    def __init__(self, program: DiffusionProgram, peer: PeerCache) -> None:
        from diffusers.hooks import (
            FasterCacheConfig,
            FirstBlockCacheConfig,
            PyramidAttentionBroadcastConfig,
            apply_faster_cache,
            apply_first_block_cache,
            apply_pyramid_attention_broadcast,
        )

        if peer.method not in METHODS:
            raise ConfigError(f"unknown diffusers cache method '{peer.method}' (known: {', '.join(METHODS)})")
        if not peer.applies(program.spec.model_class):
            raise ConfigError(f"{peer.method} does not apply to a {program.spec.family} denoiser")
        self.model = copy.deepcopy(program.denoiser).eval()
        channels = adapter_for(program.spec.model_class).block_layout == "channels"
        self.sample_arg = "sample" if channels else "hidden_states"  # UNet2DModel's name, a transformer's
        self.timestep = 1000.0
        self.swap = peer.method == "faster-cache"
        current = lambda: self.timestep  # noqa: E731
        if peer.method == "first-block-cache":
            apply_first_block_cache(self.model, FirstBlockCacheConfig(**peer.settings))
        elif peer.method == "pyramid-attention-broadcast":
            config = PyramidAttentionBroadcastConfig(**peer.settings, current_timestep_callback=current)
            apply_pyramid_attention_broadcast(self.model, config)
        else:
            config = FasterCacheConfig(
                **peer.settings,
                current_timestep_callback=current,
                tensor_format="BCHW",
                _unconditional_conditional_input_kwargs_identifiers=[self.sample_arg, "timestep", "class_labels"],
            )
            apply_faster_cache(self.model, config)

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()
        # FirstBlockCache keys its state by a context name; one batch, one context.
        _set_cache_context(self.model, CacheContext("batch"))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.timestep = float(t[0])
        y = cond.get("class_labels")
        if self.swap:
            x, t, y = (_swap_halves(v) if v is not None else None for v in (x, t, y))
        with torch.inference_mode():
            out = self.model(**{self.sample_arg: x}, timestep=t, class_labels=y, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma: eps only, as the adapter does
            out = out[:, : x.shape[1]]
        return _swap_halves(out) if self.swap else out


def _swap_halves(v: torch.Tensor) -> torch.Tensor:
    a, b = v.chunk(2)
    return torch.cat([b, a])
