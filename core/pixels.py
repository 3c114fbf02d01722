"""Model-space samples as images: [-1, 1] -> [0, 1] and uint8 pixels, as diffusers pipelines post-process."""

from __future__ import annotations

import numpy as np
import torch


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1], as diffusers pipelines post-process (NaN shows as black)."""
    return torch.nan_to_num(x / 2 + 0.5, nan=0.0).clamp(0, 1)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Model space [N, C, H, W] -> uint8 [N, H, W, C]: what `optimize sample` writes and the served
    pipeline returns."""
    return (to_images(x).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
