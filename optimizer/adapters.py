"""Per-architecture knowledge: how to build, call and describe each supported denoiser class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import LoadError
from .ir import Conditioning, DiffusionProgram, ModelSpec
from .sampling import DenoiseFn
from .validate import is_int


@dataclass(frozen=True)
class Adapter:
    family: str
    model_class: str
    # Config counts and sizes capped before anything is built (see limits.check_caps).
    CAPS: ClassVar[dict[str, int]] = {}

    def build(self, config: dict[str, Any]) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, self.model_class)
        try:
            return cls.from_config(config)
        except Exception as exc:  # diffusers raises many types for a bad config
            raise LoadError(f"invalid {self.model_class} config: {exc}") from exc

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = model(x, t, class_labels=y, return_dict=False)[0]
        channels = x.shape[1]
        # Learned-sigma models (DiT-XL style) emit [eps, variance]; the loop uses eps only.
        return out[:, :channels] if out.shape[1] == 2 * channels else out

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


class DiTAdapter(Adapter):
    CAPS: ClassVar[dict[str, int]] = {
        "num_layers": 1024,
        "num_attention_heads": 1024,
        "attention_head_dim": 4096,
        "sample_size": 4096,
        "patch_size": 64,
        "in_channels": 4096,
        "out_channels": 4096,
        "num_embeds_ada_norm": 1_000_000,
    }

    def conditioning(self, model: nn.Module) -> Conditioning:
        num = model.config.num_embeds_ada_norm
        rows = self.label_rows(model)
        return Conditioning(num_classes=num, null_class=num if rows > num else None)

    def label_rows(self, model: nn.Module) -> int:
        return model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        blocks = tuple(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks)))
        temporal = (*(f"{b}.norm1.{part}" for b in blocks for part in ("emb", "linear")), "proj_out_1")
        return blocks, temporal


class UNetAdapter(Adapter):
    CAPS: ClassVar[dict[str, int]] = {
        "sample_size": 4096,
        "in_channels": 4096,
        "out_channels": 4096,
        "block_out_channels": 65536,
        "layers_per_block": 64,
        "attention_head_dim": 4096,
        "norm_num_groups": 4096,
        "num_class_embeds": 1_000_000,
        "num_train_timesteps": 100_000,
    }

    def conditioning(self, model: nn.Module) -> Conditioning:
        # A plain UNet2DModel does not say which label (if any) is the unconditional one.
        return Conditioning(num_classes=model.config.num_class_embeds or 0, null_class=None)

    def label_rows(self, model: nn.Module) -> int:
        table = model.class_embedding
        return table.num_embeddings if isinstance(table, nn.Embedding) else 0

    def describe(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        down = (f"down_blocks.{i}" for i in range(len(model.down_blocks)))
        up = (f"up_blocks.{i}" for i in range(len(model.up_blocks)))
        blocks = (*down, "mid_block", *up)
        temporal = ("time_proj", "time_embedding") + (("class_embedding",) if model.class_embedding else ())
        temporal += tuple(n for n, _ in model.named_modules() if n.endswith("time_emb_proj"))
        return blocks, temporal


ADAPTERS: dict[str, Adapter] = {
    a.model_class: a for a in (DiTAdapter("dit", "DiTTransformer2DModel"), UNetAdapter("unet", "UNet2DModel"))
}


def adapter_for(model_class: str) -> Adapter:
    try:
        return ADAPTERS[model_class]
    except KeyError:
        raise LoadError(
            f"unsupported architecture '{model_class}' (supported: {', '.join(sorted(ADAPTERS))})"
        ) from None


class Denoiser(nn.Module):
    """A uniform, export-friendly call: (sample, timestep[float, B], class_labels[int64, B]) -> eps."""

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        return self.adapter.forward(self.model, sample, timestep, class_labels)


def denoiser_module(program: DiffusionProgram) -> Denoiser:
    return Denoiser(program.denoiser, adapter_for(program.spec.model_class)).eval()


def torch_denoise(program: DiffusionProgram) -> DenoiseFn:
    """The program's denoiser as a loop callable, without autograd."""
    module = denoiser_module(program)

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            return module(x, t, y)

    return denoise


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def respec(program: DiffusionProgram, model: nn.Module) -> DiffusionProgram:
    """The program with a structurally changed denoiser (pruned, blocks removed) and its spec re-derived."""
    spec = program.spec
    adapter = adapter_for(spec.model_class)
    return program.replace(denoiser=model.eval(), spec=adapter.spec(model, spec.conditioning, spec.prediction_type))
