"""Distribution in the original denoiser's own feature space, for any model we load: each sample is
noised to a fixed low noise level (10% of the training timesteps, one fixed noise draw per sample index)
and run through the *original* denoiser with its own condition; the sample stream of the blocks at a
quarter, half and three quarters of the depth, averaged over tokens or positions, is its feature vector.
Diffusion denoisers are strong feature extractors at low noise (Xiang et al. 2023, "Denoising Diffusion
Autoencoders are Unified Self-supervised Learners"), and this space exists for every family: no
external network, no download. Fréchet distances are stated against the original's seed-to-seed floor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from core.adapters import adapter_for, denoiser_module
from core.conditions import encode
from core.ir import DiffusionProgram
from core.schedulers import build_scheduler
from verify.judges.base import Evaluate, FloorFD, Judge, JudgeOptions, Outputs, floor_metrics

NOISE_FRACTION = 0.1  # t* = 10% of the training timesteps (flow matching: sigma 0.1)
FEATURE_SEED = 7_000_000  # the noise of sample i is drawn from seed FEATURE_SEED + i, in every set
BATCH = 16
PREFIX = "fd_self"


def feature_blocks(blocks: tuple[str, ...]) -> list[str]:
    """The blocks at a quarter, half and three quarters of the depth (fewer for a shallow stack)."""
    n = len(blocks)
    return [blocks[i] for i in sorted({n // 4, n // 2, (3 * n) // 4} & set(range(n)))]


class DenoiserFeatures:
    """The original program's feature map: samples (model space) + conditions -> [N, D] features."""

    def __init__(self, program: DiffusionProgram) -> None:
        self.program = program
        self.module = denoiser_module(program)
        self.adapter = adapter_for(program.spec.model_class)
        self.blocks = feature_blocks(program.spec.blocks)
        scheduler = build_scheduler(program.plan)
        train = scheduler.config.num_train_timesteps
        self.t = float(round(NOISE_FRACTION * train))
        cumprod = getattr(scheduler, "alphas_cumprod", None)
        if cumprod is not None:  # x_t = sqrt(a) x0 + sqrt(1 - a) eps, the model's own input convention
            a = float(cumprod[int(self.t)])
            self.scale, self.sigma = a**0.5, (1 - a) ** 0.5
        else:  # flow matching: x_t = (1 - s) x0 + s eps
            self.scale, self.sigma = 1 - NOISE_FRACTION, NOISE_FRACTION

    def __call__(self, samples: torch.Tensor, conditions: Sequence[Any] | None) -> np.ndarray:
        if not bool(torch.isfinite(samples).all()):
            return np.full((len(samples), 1), np.inf)  # a diverged candidate: no distance is finite
        cond = encode(self.program, conditions, len(samples)).cond
        names = self.program.spec.conditioning.input_names
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            self.module.model.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: captured.__setitem__(name, self.adapter.pooled(out))
            )
            for name in self.blocks
        ]
        features = []
        try:
            for start in range(0, len(samples), BATCH):
                rows = slice(start, start + BATCH)
                x0 = samples[rows].float()
                noise = torch.cat(
                    [
                        torch.randn((1, *x0.shape[1:]), generator=torch.Generator().manual_seed(FEATURE_SEED + i))
                        for i in range(start, start + len(x0))
                    ]
                )
                x = self.scale * x0 + self.sigma * noise
                t = torch.full((len(x0),), self.t)
                with torch.inference_mode():
                    self.module(x, t, *(cond[n][rows] for n in names))
                features.append(torch.cat([captured[n] for n in self.blocks], 1).double())
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat(features).numpy()


class DenoiserFeaturesJudge(Judge):
    name = "denoiser-features"
    applies_to = "every model we load (its own denoiser's features)"
    metrics: ClassVar = floor_metrics(PREFIX, "in the original denoiser's own features at low noise")

    def provides(self, program: DiffusionProgram, options: JudgeOptions) -> frozenset[str]:
        return self.metric_keys() if program.spec.blocks else frozenset()

    def why_not(self, program: DiffusionProgram, options: JudgeOptions) -> str:
        return "the model's adapter describes no blocks to read features from"

    def prepare(self, program: DiffusionProgram, options: JudgeOptions, reference: Outputs, floor: Outputs) -> Evaluate:
        features = DenoiserFeatures(program)
        fd = FloorFD(
            PREFIX, features(reference.samples, reference.conditions), features(floor.samples, floor.conditions)
        )
        return lambda candidate: fd(features(candidate.samples, candidate.conditions))


JUDGE = DenoiserFeaturesJudge()
