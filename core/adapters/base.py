"""What every family adapter provides: build, call with its conditioning, describe (blocks, temporal
modules, attention sites) and the config caps checked before building."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from core.errors import LoadError
from core.ir import Conditioning, ModelSpec
from core.validate import is_int

GUIDANCE = "guidance"  # the embedded guidance scale in an adapter's `cond` (Denoiser adds it, per sample)


@dataclass(frozen=True)
class Adapter:
    family: str
    model_class: str
    # Config counts and sizes capped before anything is built (see limits.check_caps).
    CAPS: ClassVar[dict[str, int]] = {}
    # The layout of a block's sample stream: "tokens" ([B, N, D]) or "channels" ([B, C, *spatial]).
    block_layout: ClassVar[str] = "tokens"

    def block_stream(self, output: Any) -> torch.Tensor:
        """The sample stream of a block's output (a UNet level also returns its skip features; a joint
        block returns the text stream first, see the MMDiT adapters)."""
        return output[0] if isinstance(output, tuple) else output

    def pooled(self, output: Any) -> torch.Tensor:
        """A block's output as one vector per sample ([B, D]): its sample stream averaged over tokens
        or positions."""
        stream = self.block_stream(output)
        if self.block_layout == "channels":
            return stream.flatten(2).mean(2)
        return stream.mean(1)

    def build(self, config: dict[str, Any]) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, self.model_class)
        try:
            return cls.from_config(config)
        except Exception as exc:  # diffusers raises many types for a bad config
            raise LoadError(f"invalid {self.model_class} config: {exc}") from exc

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        out = model(x, t, class_labels=cond.get("class_labels"), return_dict=False)[0]
        channels = x.shape[1]
        # Learned-sigma models (DiT-XL style) emit [eps, variance]; the loop uses eps only.
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def embeds_guidance(self, config: Mapping[str, Any]) -> bool:
        """Whether the denoiser takes the guidance scale as an input embedding (guidance-distilled: Flux's
        guidance_embeds, an LCM UNet's time_cond_proj_dim); its pipelines then run no classifier-free guidance."""
        return False

    def probe_conditions(self, config: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
        """Condition tensors for one sample, to probe the model's cost before its weights are loaded."""
        return {"class_labels": torch.zeros(1, dtype=torch.int64, device=device)}

    def conditioning(self, model: nn.Module) -> Conditioning:
        raise NotImplementedError

    def label_rows(self, model: nn.Module) -> int:
        """Rows of the class-label embedding table (0: the model takes no labels)."""
        raise NotImplementedError

    def check_conditioning(self, model: nn.Module, conditioning: Conditioning, where: str) -> None:
        rows = self.label_rows(model)
        if rows and conditioning.num_classes < 1:
            raise LoadError(f"{where}: the model takes class labels, so conditioning.num_classes must be >= 1")
        if conditioning.num_classes > rows:
            raise LoadError(
                f"{where}: conditioning.num_classes {conditioning.num_classes} exceeds the model's "
                f"class-embedding table ({rows} rows)"
            )
        null = conditioning.null_class
        if null is not None and not (conditioning.num_classes <= null < rows):
            raise LoadError(
                f"{where}: conditioning.null_class {null} is out of range: the unconditional label must be a "
                f"row of the class-embedding table after the {conditioning.num_classes} classes, in "
                f"[{conditioning.num_classes}, {rows})"
            )

    def sample_shape(self, config: dict[str, Any]) -> tuple[int, int, int]:
        size, channels = config.get("sample_size"), config.get("in_channels")
        h, w = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, list | tuple) else (0, 0)
        if not all(is_int(v) and v > 0 for v in (channels, h, w)):
            raise LoadError(
                f"{self.model_class} config: in_channels and sample_size (an integer or [height, width]) "
                f"must be positive integers, got {channels!r} and {size!r}"
            )
        return (channels, h, w)

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(blocks, temporal modules)."""
        raise NotImplementedError

    def spec(self, model: nn.Module, conditioning: Conditioning | None, prediction_type: str) -> ModelSpec:
        from diffusers.models.attention_processor import Attention

        config = dict(model.config)
        blocks, temporal = self.describe(model)
        return ModelSpec(
            family=self.family,
            model_class=self.model_class,
            model_config={k: v for k, v in config.items() if not k.startswith("_")},
            sample_shape=self.sample_shape(config),
            conditioning=conditioning or self.conditioning(model),
            prediction_type=prediction_type,
            blocks=blocks,
            attention_sites=tuple(n for n, m in model.named_modules() if isinstance(m, Attention)),
            temporal_modules=temporal,
        )
