"""The IR: a DiffusionProgram is a denoiser network plus the sampling loop that calls it."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError
from core.limits import MAX_TRAIN_TIMESTEPS
from core.placement import Placement
from core.validate import finite_tree, get, integer, is_int, number

# The graph variants a loop can run (built by core.variants): one network, or a cache schedule's two.
DENOISER, FULL, CACHED = "denoiser", "full", "cached"


CONDITION_DTYPES = ("float32", "int64")
# A sample's axes by name: an image (or latent) is channels x height x width; a video adds frames; an
# action chunk is horizon x action_dim. Metrics, grids and output stages read the names, never the rank.
IMAGE_AXES = ("channels", "height", "width")
# What the denoiser predicts: noise, v (Salimans & Ho 2022), the clean sample, or the flow velocity
# (flow matching; UniPC's `flow_prediction` is this). Anything else is refused, never taken for epsilon.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
MAX_SAMPLE_RANK = 5
MAX_FEATURES = 1 << 16  # entries of one normalization vector


@dataclass(frozen=True)
class Normalization:
    """An affine map to the space the network works in, along a tensor's last axis: normalized =
    (x - center) / spread. LeRobot's mean/std (center = mean, spread = std) and min/max to [-1, 1]
    (center = (max + min) / 2, spread = (max - min) / 2) are both this; one entry broadcasts."""

    center: tuple[float, ...]
    spread: tuple[float, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.center) <= MAX_FEATURES or len(self.spread) not in (1, len(self.center)):
            raise ConfigError("a normalization needs 1 to 65536 centers and one spread or one per center")
        if not all(math.isfinite(c) for c in self.center) or not all(math.isfinite(s) and s > 0 for s in self.spread):
            raise ConfigError("a normalization's centers must be finite and its spreads finite and > 0")

    def check_fits(self, shape: tuple[int, ...], where: str) -> None:
        """One entry, or one per entry of the last axis of `shape` (a per-sample shape)."""
        if not shape or len(self.center) not in (1, shape[-1]):
            raise ConfigError(
                f"{where}: a normalization of {len(self.center)} features cannot apply to shape {list(shape)}"
            )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        center, spread = self._vectors(x)
        return ((x.double() - center) / spread).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        center, spread = self._vectors(x)
        return (x.double() * spread + center).to(x.dtype)

    def _vectors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In float64: a constant feature's spread (LeRobot's 1e-8) is below float32's resolution of its center."""
        self.check_fits(tuple(x.shape), "normalizing a tensor")
        kw = {"dtype": torch.float64, "device": x.device}
        return torch.tensor(self.center, **kw), torch.tensor(self.spread, **kw)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Normalization:
        center, spread = get(data, "center", list, where), get(data, "spread", list, where)
        return cls(
            tuple(number(c, f"{where}.center") for c in center), tuple(number(s, f"{where}.spread") for s in spread)
        )


@dataclass(frozen=True)
class ConditionInput:
    """One condition tensor the denoiser takes after (sample, timestep): its name (the diffusers keyword),
    per-sample shape (without the batch dimension) and dtype; an observation's also how it is normalized
    before the denoiser reads it (None: fed as is)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    normalization: Normalization | None = None

    def __post_init__(self) -> None:
        if self.normalization is not None:
            self.normalization.check_fits(self.shape, f"condition '{self.name}'")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ConditionInput:
        shape = get(data, "shape", list, where)
        dtype = get(data, "dtype", str, where, "float32")
        if dtype not in CONDITION_DTYPES:
            raise ConfigError(f"{where}.dtype must be one of {', '.join(CONDITION_DTYPES)}, got {dtype!r}")
        norm = get(data, "normalization", (dict, type(None)), where, None)
        return cls(
            get(data, "name", str, where),
            tuple(integer(d, f"{where}.shape", 1, 1 << 20) for d in shape),
            dtype,
            None if norm is None else Normalization.from_dict(norm, f"{where}.normalization"),
        )


CLASS_LABELS = ConditionInput("class_labels", (), "int64")


@dataclass(frozen=True)
class Conditioning:
    """How the denoiser is conditioned.

    Class models: `num_classes` labels; `null_class` is the label of the unconditional branch (None: no
    guidance). Text models: `text` lists the tensors the prompt encoder produces (sequence embeddings,
    masks, pooled embeddings, extra ids), and the unconditional branch is the empty prompt's encoding.
    Observation models (policies): `observation` lists the named tensors a data set or environment gives
    per sample, each normalized as it says; no unconditional branch.
    """

    num_classes: int = 0
    null_class: int | None = None
    text: tuple[ConditionInput, ...] = ()
    # The guidance scale a guidance-embedded denoiser is fed (Flux's guidance_embeds, an LCM UNet's
    # time_cond_proj_dim), instead of classifier-free guidance; None: the model embeds none.
    embedded_guidance: float | None = None
    observation: tuple[ConditionInput, ...] = ()

    @property
    def kind(self) -> str:
        if self.observation:
            return "observation"
        return "text" if self.text else "class" if self.num_classes else "none"

    @property
    def inputs(self) -> tuple[ConditionInput, ...]:
        """The condition tensors the denoiser takes after (sample, timestep), in call order."""
        return self.text or self.observation or ((CLASS_LABELS,) if self.num_classes else ())

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def supports_guidance(self) -> bool:
        return bool(self.text) or (self.num_classes > 0 and self.null_class is not None)

    def to_dict(self) -> dict[str, Any]:
        """As plan.json and report.json store it: the observation list and the normalizations only where set."""
        data = dataclasses.asdict(self)
        for entry in (*data["text"], *data["observation"]):
            if entry["normalization"] is None:
                del entry["normalization"]
        if not self.observation:
            del data["observation"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "conditioning") -> Conditioning:
        """Read a sidecar's or plan.json's conditioning, every field type-checked and bounded."""
        num = integer(get(data, "num_classes", object, where), f"{where}.num_classes", 0, 1_000_000)
        null = get(data, "null_class", (int, type(None)), where, None)
        if null is not None:
            integer(null, f"{where}.null_class", 0, 1_000_000)
        text = get(data, "text", list, where, [])
        if not all(isinstance(t, dict) for t in text):
            raise ConfigError(f"{where}.text must be a list of objects")
        inputs = tuple(ConditionInput.from_dict(t, f"{where}.text[{i}]") for i, t in enumerate(text))
        observed = get(data, "observation", list, where, [])
        if not all(isinstance(o, dict) for o in observed):
            raise ConfigError(f"{where}.observation must be a list of objects")
        observation = tuple(ConditionInput.from_dict(o, f"{where}.observation[{i}]") for i, o in enumerate(observed))
        if sum(map(bool, (text, num, observation))) > 1:
            raise ConfigError(f"{where}: a model is conditioned on classes, text or observations, not two of them")
        if observation and null is not None:
            raise ConfigError(f"{where}: an observation model has no null class")
        embedded = get(data, "embedded_guidance", (int, float, type(None)), where, None)
        if embedded is not None:
            embedded = number(embedded, f"{where}.embedded_guidance", 0.0, 1000.0)
        return cls(num, null, inputs, embedded, observation)


@dataclass(frozen=True)
class Chunking:
    """How a policy acts on its samples (action chunks, Chi et al. 2023): it reads the last `n_obs_steps`
    observations and executes `n_action_steps` actions of each chunk, from index n_obs_steps - 1 (the
    current observation's), before it samples the next chunk."""

    n_obs_steps: int
    n_action_steps: int

    def __post_init__(self) -> None:
        if not (is_int(self.n_obs_steps) and is_int(self.n_action_steps) and self.n_obs_steps >= 1):
            raise ConfigError("a policy's n_obs_steps and n_action_steps must be positive integers")
        if self.n_action_steps < 1:
            raise ConfigError("a policy's n_action_steps must be positive")

    @property
    def first(self) -> int:
        return self.n_obs_steps - 1


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about the denoiser's architecture."""

    family: str  # the adapter's family name ("dit", "unet", "sd-unet", ...)
    model_class: str  # diffusers class name (the key of its adapter)
    model_config: dict[str, Any]
    sample_shape: tuple[int, ...]  # per sample, e.g. (C, H, W); its axes are named by `sample_axes`
    conditioning: Conditioning
    prediction_type: str  # one of PREDICTION_TYPES
    blocks: tuple[str, ...]  # module names of the repeated blocks, in execution order
    attention_sites: tuple[str, ...]  # module names of attention layers
    temporal_modules: tuple[str, ...]  # modules whose output depends on (t, class) only
    # Structural lineage: for each of `blocks`, the index of the original block it descends from
    # (None: the original blocks, unchanged). Set by passes that remove blocks; read by recovery.
    block_origin: tuple[int, ...] | None = None
    sample_axes: tuple[str, ...] = IMAGE_AXES
    # The output stage of a model whose samples are normalized (a policy's actions): final samples are
    # un-normalized by it. None: the samples are the output (images in [-1, 1], or latents a VAE decodes).
    output_normalization: Normalization | None = None
    chunking: Chunking | None = None  # a policy's (None: not a policy)

    def __post_init__(self) -> None:
        check_sample_axes(self.sample_shape, self.sample_axes, "model spec")
        if self.chunking is not None and self.chunking.first + self.chunking.n_action_steps > self.sample_shape[0]:
            raise ConfigError("a policy's chunk must hold n_obs_steps - 1 + n_action_steps actions")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
                " (the scheduler config's prediction_type)"
            )
        if self.output_normalization is not None:
            self.output_normalization.check_fits(self.sample_shape, "the output normalization")

    @property
    def image_like(self) -> bool:
        """Whether a sample is an image or a stack of them (its last axes height and width)."""
        return self.sample_axes[-2:] == IMAGE_AXES[-2:]

    def origins(self) -> tuple[int, ...]:
        return self.block_origin if self.block_origin is not None else tuple(range(len(self.blocks)))


def check_sample_axes(shape: tuple[int, ...], axes: tuple[str, ...], where: str) -> None:
    """1 to 5 positive sizes, one distinct axis name each."""
    if not 1 <= len(shape) <= MAX_SAMPLE_RANK or not all(is_int(d) and d > 0 for d in shape):
        raise ConfigError(f"{where}: a sample shape is 1 to {MAX_SAMPLE_RANK} positive sizes, got {list(shape)}")
    if len(axes) != len(shape) or len(set(axes)) != len(axes) or not all(isinstance(a, str) and a for a in axes):
        raise ConfigError(f"{where}: sample axes {list(axes)} must name each of the {len(shape)} axes once")


@dataclass(frozen=True)
class CacheSchedule:
    """Feature reuse across steps (DeepCache / FORA / Δ-DiT style), decided ahead of time.

    `region` = (first, stop) over the family's levels: blocks [first, stop) of a block stack (DiT, PixArt)
    whose summed residual is reused; UNet levels [first, stop) (down block, matching up block and everything
    deeper) whose output feature is reused. At a refresh step the full network runs and stores the tensor; at the
    other steps the region is skipped and the stored tensor from the last refresh step stands in.
    """

    family: str  # the denoiser's family (its adapter's cache_cut gives the region its meaning)
    region: tuple[int, int]
    refresh: tuple[bool, ...]  # per step; step 0 always refreshes

    def __post_init__(self) -> None:
        first, stop = self.region
        if not 0 <= first < stop:
            raise ValueError(f"cache region {self.region} is empty or negative")
        if not self.refresh or not self.refresh[0]:
            raise ValueError("a cache schedule must refresh at step 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSchedule:
        where = "sampling.cache"
        region = get(data, "region", list, where)
        refresh = get(data, "refresh", list, where)
        if len(region) != 2 or not all(is_int(r) for r in region):
            raise ConfigError(f"{where}.region must be [first, stop]")
        if not all(isinstance(r, bool) for r in refresh):
            raise ConfigError(f"{where}.refresh must be a list of true/false")
        return cls(get(data, "family", str, where), (region[0], region[1]), tuple(refresh))


@dataclass(frozen=True)
class SamplingPlan:
    """The loop: scheduler (diffusers class + config), step count, guidance and its per-step policy, cache."""

    scheduler_class: str
    scheduler_config: dict[str, Any]
    num_inference_steps: int
    guidance_scale: float = 1.0
    guided_steps: tuple[bool, ...] | None = None  # per model call: run the unconditional pass? None: every call
    cache: CacheSchedule | None = None
    # Flow matching (SD3, Flux): the resolution-dependent shift `mu` of dynamic-shifting schedulers, and
    # whether the pipeline passes sigmas linspace(1, 1/n, n) (FluxPipeline) instead of the scheduler's own.
    mu: float | None = None
    linear_sigmas: bool = False
    # Custom timesteps (train-timestep units, descending), e.g. a searched schedule or a distilled
    # student's grid; None: the scheduler's own spacing for `num_inference_steps`.
    timesteps: tuple[float, ...] | None = None
    # A policy's warm-started chunks (Streaming Diffusion Policy, Høeg et al. 2024; Real-Time Iteration,
    # Duan et al. 2025): after an episode's first decision, the loop runs only its timesteps at or below this
    # one, from the previous chunk's unexecuted remainder noised to the first of them
    # (core.warm_start). None: every chunk starts from noise.
    warm_start: float | None = None

    def __post_init__(self) -> None:
        n = self.num_inference_steps
        if self.timesteps is not None:
            ts = self.timesteps
            if len(ts) != n or any(not a > b for a, b in itertools.pairwise(ts)) or min(ts) < 0:
                raise ConfigError(f"sampling.timesteps must be {n} descending values >= 0")
        if self.warm_start is not None and self.cache is not None:
            raise ConfigError("sampling: warm-started chunks do not combine with a cache schedule")
        # guided_steps and cache.refresh hold one entry per model call (core.schedulers.model_calls: a step of
        # PNDM's warm-up or of Heun's second order calls the model more than once), checked there.
        if self.cache is None:
            return
        calls = len(self.cache.refresh)
        if self.guided_steps is not None and len(self.guided_steps) != calls:
            raise ValueError(f"guided_steps has {len(self.guided_steps)} entries for {calls} cache entries")
        last = 0
        for i in range(calls):
            if self.cache.refresh[i]:
                last = i
            elif self.guided(i) and not self.guided(last):
                raise ValueError(f"step {i} is guided but reuses features of unguided step {last}")

    def guided(self, step: int) -> bool:
        """Whether model call `step` runs the unconditional pass too (given guidance is on at all)."""
        return self.guided_steps is None or self.guided_steps[step]

    def variant(self, step: int) -> str:
        """Which graph variant model call `step` runs: "denoiser" (no cache), "full" (refresh) or "cached"."""
        if self.cache is None:
            return DENOISER
        return FULL if self.cache.refresh[step] else CACHED

    def without_loop_policy(self) -> SamplingPlan:
        """The loop of one sample from noise: no per-call guidance or cache policy, no warm start."""
        return dataclasses.replace(self, guided_steps=None, cache=None, warm_start=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingPlan:
        """Read a plan written by `to_dict` (e.g. from plan.json), every field type-checked."""
        where = "sampling"
        guided = get(data, "guided_steps", (list, type(None)), where, None)
        cache = get(data, "cache", (dict, type(None)), where, None)
        config = get(data, "scheduler_config", dict, where)
        finite_tree(config, f"{where}.scheduler_config")
        if guided is not None and not all(isinstance(g, bool) for g in guided):
            raise ConfigError(f"{where}.guided_steps must be a list of true/false")
        return cls(
            get(data, "scheduler_class", str, where),
            config,
            integer(get(data, "num_inference_steps", int, where), f"{where}.num_inference_steps", 1),
            number(get(data, "guidance_scale", (int, float), where, 1.0), f"{where}.guidance_scale", 0.0),
            tuple(guided) if guided is not None else None,
            CacheSchedule.from_dict(cache) if cache is not None else None,
            _optional_number(get(data, "mu", (int, float, type(None)), where, None), f"{where}.mu"),
            get(data, "linear_sigmas", bool, where, False),
            _timesteps(get(data, "timesteps", (list, type(None)), where, None), f"{where}.timesteps"),
            _optional_timestep(get(data, "warm_start", (int, float, type(None)), where, None), f"{where}.warm_start"),
        )


def _timesteps(values: list | None, where: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    return tuple(number(v, where, 0.0, float(MAX_TRAIN_TIMESTEPS)) for v in values)


def _optional_timestep(value: float | None, where: str) -> float | None:
    return None if value is None else number(value, where, 0.0, float(MAX_TRAIN_TIMESTEPS))


def _optional_number(value: float | None, where: str) -> float | None:
    return None if value is None else number(value, where, -100.0, 100.0)


class Decision:
    """What a pass decided. Each pass subclasses it as a frozen dataclass with typed fields; the report
    stores `to_dict()` in report.json and puts `markdown()` (the pass's own section) in report.md."""

    title = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def markdown(self) -> list[str]:
        return []


@dataclass(frozen=True)
class PassRecord:
    """One applied pass: its config, what it decided, the fidelity measured right after it, its wall time."""

    name: str
    phase: str
    config: dict[str, Any]
    decision: Decision
    fidelity: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class Source:
    """Where the program came from: the input path, its format, a digest of what was read, and notes on
    what loading chose or left out (a variant, the stored precision, a pipeline default, a safety checker)."""

    path: str
    format: str
    digest: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stages:
    """What a latent pipeline runs around its denoiser: prompt encoding before, decoding after.

    `text_encoders` / `tokenizers`: the pipeline's own (transformers) components, in the pipeline's
    order; `vae`: its autoencoder (None: the denoiser works in pixel space); `prompts`: the prompt set
    that calibration and verification run over; `observations`: an observation model's set (name -> raw
    tensors [M, ...], the rows a data set or environment gave); `environment`: a policy's, by name. Passes optimize
    the denoiser and carry these along.
    """

    text_encoders: tuple[nn.Module, ...] = ()
    tokenizers: tuple[Any, ...] = ()
    vae: nn.Module | None = None
    prompts: tuple[str, ...] = ()
    observations: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    environment: str | None = None  # where a policy is judged closed loop (core.environments), e.g. "pusht"
    options: dict[str, Any] = field(default_factory=dict)  # the pipeline's own settings (model_index.json)
    # Prompt -> its condition tensors: each prompt is encoded once per stages (core.prompts).
    encoded: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each side (0: no VAE)."""
        if self.vae is None:
            return 0
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass(frozen=True)
class DiffusionProgram:
    denoiser: nn.Module
    spec: ModelSpec
    plan: SamplingPlan
    source: Source
    provenance: tuple[PassRecord, ...] = field(default=())
    stages: Stages = field(default_factory=Stages)
    placement: Placement = field(default_factory=Placement)  # where and in what dtype its modules run

    def replace(self, **changes: Any) -> DiffusionProgram:
        return dataclasses.replace(self, **changes)

    def decision(self, pass_name: str) -> Any:
        """The decision of the last applied pass named `pass_name` (None if it did not run)."""
        found = [r.decision for r in self.provenance if r.name == pass_name]
        return found[-1] if found else None

    def fingerprint(self) -> str:
        """Identifies (weights, loop, passes with their configs): the key analyses are cached under."""
        content: dict[str, Any] = {
            "source": self.source.digest,
            "plan": self.plan.to_dict(),
            "prompts": list(self.stages.prompts),
            "passes": [{"name": p.name, "config": p.config} for p in self.provenance],
        }
        # Only where set, so the fingerprints of other programs stay what they were.
        if self.stages.observations:
            content["observations"] = _tensors_digest(self.stages.observations)
        if not self.placement.is_default:
            content["placement"] = dataclasses.asdict(self.placement)
        payload = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{list(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
