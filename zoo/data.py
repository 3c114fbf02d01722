"""The digits data set (sklearn's load_digits), upsampled to 16x16 and scaled to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10


def load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N,1,16,16] in [-1, 1], labels [N] int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.from_numpy(digits.target.astype(np.int64))


def split(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded train/held-out index split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(n * (1 - holdout))
    return perm[:cut], perm[cut:]
