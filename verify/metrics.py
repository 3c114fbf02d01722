"""Fidelity metrics on images in [0, 1] ([N, C, H, W]) and on classifier features."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg


def psnr(reference: torch.Tensor, candidate: torch.Tensor, max_db: float = 200.0) -> torch.Tensor:
    """Per-sample PSNR in dB (data range 1); identical images are capped at `max_db`."""
    mse = (reference.double() - candidate.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(reference: torch.Tensor, candidate: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-sample SSIM (Wang et al. 2004) with a Gaussian window, valid region, data range 1."""
    channels = reference.shape[1]
    w = _gaussian_window(window, sigma).expand(channels, 1, window, window)
    a, b = reference.double(), candidate.double()

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference|| over the whole tensor."""
    ref = reference.double()
    return float((candidate.double() - ref).norm() / ref.norm().clamp_min(1e-12))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as FID, in any feature space)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.cov(features_a, rowvar=False)
    cov_b = np.cov(features_b, rowvar=False)
    # Few samples in a wide feature space give singular covariances: regularize slightly.
    eps = 1e-6 * np.eye(cov_a.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps)).real
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    return max(0.0, float(distance))  # tiny negatives are round-off
