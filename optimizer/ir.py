"""The IR: a DiffusionProgram is a denoiser network plus the sampling loop that calls it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Conditioning:
    """Class conditioning. `null_class` is the label of the unconditional branch (None: no guidance)."""

    num_classes: int = 0
    null_class: int | None = None

    @property
    def supports_guidance(self) -> bool:
        return self.num_classes > 0 and self.null_class is not None


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about the denoiser's architecture."""

    family: str  # "dit" | "unet"
    model_class: str  # diffusers class name
    model_config: dict[str, Any]
    sample_shape: tuple[int, int, int]  # (C, H, W)
    conditioning: Conditioning
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    blocks: tuple[str, ...]  # module names of the repeated blocks, in execution order
    attention_sites: tuple[str, ...]  # module names of attention layers
    temporal_modules: tuple[str, ...]  # modules whose output depends on (t, class) only


@dataclass(frozen=True)
class SamplingPlan:
    """The loop: scheduler (diffusers class + config), step count, guidance."""

    scheduler_class: str
    scheduler_config: dict[str, Any]
    num_inference_steps: int
    guidance_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingPlan:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class PassRecord:
    """One applied pass: its config, the fidelity measured right after it, and its wall time."""

    name: str
    config: dict[str, Any]
    fidelity: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class Source:
    """Where the program came from: the input path, its format and a digest of its weights."""

    path: str
    format: str
    digest: str


@dataclass(frozen=True)
class DiffusionProgram:
    denoiser: nn.Module
    spec: ModelSpec
    plan: SamplingPlan
    source: Source
    provenance: tuple[PassRecord, ...] = field(default=())
    annotations: dict[str, Any] = field(default_factory=dict)  # per pass name: what it decided (for the report)

    def replace(self, **changes: Any) -> DiffusionProgram:
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Identifies (weights, loop): what calibration data depends on."""
        payload = json.dumps(
            {"source": self.source.digest, "plan": self.plan.to_dict(), "passes": [p.name for p in self.provenance]},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
