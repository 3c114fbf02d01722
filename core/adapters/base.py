"""What every family adapter provides: build, call with its conditioning, describe (blocks, temporal
modules, attention sites) and the config caps checked before building; and the description of its family
that the techniques read instead of naming families (diffusers' block registry plays this role for its
cache hooks): the block stack, the cache cut points, the prunable units, the layers that read the prompt."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from core.errors import LoadError
from core.ir import IMAGE_AXES, Chunking, Conditioning, ModelSpec, Normalization
from core.surgery import ChannelSite, MlpSite
from core.validate import is_int

GUIDANCE = "guidance"  # the embedded guidance scale in an adapter's `cond` (Denoiser adds it, per sample)

# Cache cut points (core.caching): a range of the block stack whose summed residual is reused (FORA,
# Δ-DiT), or the levels of a UNet whose up-path feature is reused (DeepCache).
BLOCK_RANGE, UNET_LEVELS = "block-range", "unet-levels"
# Prunable units (passes.prune): an Attention's heads (self / cross), an MLP's hidden units, a residual
# block's inner channels (whole GroupNorm groups).
HEADS, CROSS_HEADS, MLP, CHANNELS = "heads", "cross_heads", "mlp", "channels"


def same_batch(*tensors: torch.Tensor) -> None:
    """Tell torch.export every input shares the batch dimension (a model may only imply it later)."""
    for tensor in tensors[1:]:
        torch._check(tensor.shape[0] == tensors[0].shape[0])


@dataclass(frozen=True)
class Adapter:
    family: str
    model_class: str
    # Config counts and sizes capped before anything is built (see limits.check_caps).
    CAPS: ClassVar[dict[str, int]] = {}
    # The layout of a block's sample stream: "tokens" ([B, N, D]) or "channels" ([B, C, *spatial]).
    block_layout: ClassVar[str] = "tokens"

    # The family's description, read by the techniques.
    # The attribute holding the stack of identical blocks (removable, linearizable, cacheable as a range),
    # and the config field that counts them; None: no such stack (UNet levels change resolution).
    block_stack: ClassVar[str | None] = None
    depth_field: ClassVar[str | None] = None
    self_attention: ClassVar[str] = "attn1"  # a stack block's self-attention (what linearize replaces)
    cache_cut: ClassVar[str | None] = None  # BLOCK_RANGE, UNET_LEVELS or None (feature caching refused)
    prunable: ClassVar[tuple[str, ...]] = ()  # the unit kinds passes.prune may remove (HEADS, ... above)
    # The layer types passes.quantize quantizes (what core.quantized.QuantizedLayer emulates and lowers).
    quantizable: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The block stack (see `block_stack`)."""
        if self.block_stack is None:
            raise ValueError(f"a {self.family} has no block stack")
        return getattr(model, self.block_stack)

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Replace the block stack (in place), keeping the config's count of blocks in step."""
        if self.block_stack is None:
            raise ValueError(f"a {self.family} has no block stack")
        setattr(model, self.block_stack, blocks)
        if self.depth_field is not None:
            model.register_to_config(**{self.depth_field: len(blocks)})

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, int]:
        """The (rows, columns) grid of the self-attention's tokens: the sample's height and width over the
        patch size (what local and convolutional attention replacements need)."""
        patch = model.config.patch_size
        return sample_shape[-2] // patch, sample_shape[-1] // patch

    def cache_variant(
        self, model: nn.Module, region: tuple[int, int], mode: str, condition_names: tuple[str, ...]
    ) -> nn.Module | None:
        """The family's own forward restated with the cache cut points exposed (core.caching.CacheVariant),
        or None: the generic variant of `cache_cut` runs this adapter's forward with blocks substituted."""
        return None

    def prunable_units(self, model: nn.Module) -> Iterator[tuple[str, str, Any]]:
        """(name, unit kind, site) of every prunable site, in module order, the kinds in `prunable` only: a
        diffusers `Attention` for heads, a core.surgery.MlpSite for MLP units, a ChannelSite for inner
        channels. Here diffusers' blocks: a BasicTransformerBlock's self- and cross-attention heads and MLP
        units, a ResnetBlock2D's channels."""
        for name, module in model.named_modules():
            kind = type(module).__name__
            if kind == "ResnetBlock2D" and CHANNELS in self.prunable:
                yield name, CHANNELS, ChannelSite.resnet(module)
            elif kind == "BasicTransformerBlock":
                if HEADS in self.prunable:
                    yield f"{name}.attn1", HEADS, module.attn1
                if CROSS_HEADS in self.prunable and module.attn2 is not None:
                    yield f"{name}.attn2", CROSS_HEADS, module.attn2
                if MLP in self.prunable:
                    yield f"{name}.ff", MLP, MlpSite.feed_forward(module.ff)

    def prompt_projections(self, model: nn.Module) -> tuple[str, ...]:
        """The layers that read the prompt embeddings (cross-attention keys and values): the same for every
        step, so quantization may keep them fp32 at no per-step cost."""
        return tuple(n for n, _ in model.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v")))

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

    def sample_shape(self, config: dict[str, Any]) -> tuple[int, ...]:
        size: Any = config.get("sample_size")
        channels: Any = config.get("in_channels")
        h, w = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, list | tuple) else (0, 0)
        if not (is_int(channels) and is_int(h) and is_int(w) and channels > 0 and h > 0 and w > 0):
            raise LoadError(
                f"{self.model_class} config: in_channels and sample_size (an integer or [height, width]) "
                f"must be positive integers, got {channels!r} and {size!r}"
            )
        return (channels, h, w)

    def sample_axes(self, config: dict[str, Any]) -> tuple[str, ...]:
        """The names of the sample's axes (core.ir.IMAGE_AXES for images and latents)."""
        return IMAGE_AXES

    def output_normalization(self, model: nn.Module) -> Normalization | None:
        """The normalization of the samples a policy's output stage undoes (None: samples are the output)."""
        return None

    def chunking(self, model: nn.Module) -> Chunking | None:
        """How a policy executes its action chunks (None: not a policy)."""
        return None

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
            sample_axes=self.sample_axes(config),
            output_normalization=self.output_normalization(model),
            chunking=self.chunking(model),
        )
