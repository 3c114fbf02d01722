"""Fidelity metrics on outputs in [0, 1] ([N, C, ...]: images, video, 1-D signals) and on feature sets."""

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


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_per_channel(
    reference: torch.Tensor, candidate: torch.Tensor, window: int = 7, sigma: float = 1.5
) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per sample and channel, [N, C]: a Gaussian window over the last two axes
    (an image's H x W; any axes between the channel and them, e.g. video frames, are averaged over), or
    over the last axis for 1-D signals ([N, C, T]); valid region, data range 1. The window shrinks to
    the signal where it is smaller than `window`."""
    if reference.shape != candidate.shape or reference.dim() < 3:
        raise ValueError(f"SSIM needs two [N, C, ...] tensors of one shape, got {tuple(reference.shape)}")
    n, c = reference.shape[:2]
    spatial = reference.shape[2:] if reference.dim() == 3 else reference.shape[-2:]
    size = min(window, *spatial)
    size -= 1 - size % 2  # odd
    g = _gaussian(size, sigma)
    a = reference.double().reshape(-1, 1, *spatial)
    b = candidate.double().reshape(-1, 1, *spatial)

    def blur(z: torch.Tensor) -> torch.Tensor:
        if len(spatial) == 1:
            return F.conv1d(z, g.view(1, 1, -1))
        return F.conv2d(z, torch.outer(g, g).view(1, 1, size, size))

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(n, c, -1).mean(2).float()


def ssim(reference: torch.Tensor, candidate: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-sample SSIM, the mean of its channels' (see ssim_per_channel)."""
    return ssim_per_channel(reference, candidate, window, sigma).mean(1)


def psnr_per_frame(reference: torch.Tensor, candidate: torch.Tensor, max_db: float = 200.0) -> torch.Tensor:
    """Per-sample PSNR of video ([N, C, F, H, W]): each frame's, averaged over the frames (data range 1)."""
    frames = reference.shape[2]
    per = psnr(reference.transpose(1, 2).flatten(0, 1), candidate.transpose(1, 2).flatten(0, 1), max_db)
    return per.view(-1, frames).mean(1)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference|| over the whole tensor."""
    ref = reference.double()
    return float((candidate.double() - ref).norm() / ref.norm().clamp_min(1e-12))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as FID, in any feature space).

    With fewer samples than dimensions (100 images in Inception's 2048), the covariances have rank < d
    and tr sqrt(C_a C_b) is the sum of the singular values of the centered cross-product X_a X_b^T over
    sqrt((n_a - 1)(n_b - 1)): exact, and an n x n problem instead of a d x d matrix square root."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa, xb = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    trace_a, trace_b = (xa * xa).sum() / na, (xb * xb).sum() / nb
    if min(len(a), len(b)) <= a.shape[1]:
        cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    else:
        cov_a, cov_b = xa.T @ xa / na, xb.T @ xb / nb
        eps = 1e-9 * np.eye(cov_a.shape[0])  # round-off on singular covariances
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cross = np.trace(linalg.sqrtm((cov_a + eps) @ (cov_b + eps)).real)
    distance = ((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * cross
    return max(0.0, float(distance))  # tiny negatives are round-off


CLIP_SD = 3.0  # standardized features are winsorized here: a few heavy-tailed samples cannot set the covariance


class ShiftBasis:
    """The original's side of the distribution shift (reference and floor sets), prepared once; calling it
    with a candidate's features (paired with the reference, row for row) gives the shift's (mean term,
    covariance term) of a Fréchet distance per feature, in units of the original's per-feature variance
    (independent of the feature space's scale and of the sample count).

    Features are standardized by the original's (reference + floor) mean and spread and clipped at
    CLIP_SD. The mean term ||mu_c - mu_o||^2 is estimated without bias from the paired differences
    (||mean d||^2 - tr cov(d) / n): pairing removes the seed-to-seed variance of both sets' means, which
    dominates a two-sample estimate, and adds no bias (E d = mu_c - mu_o whatever the pairing). The
    covariance term is the candidate's Fréchet covariance term to the floor set minus the reference's own:
    their finite-sample biases cancel (Chong & Forsyth 2020 measure FD's 1/N bias; here it is the same for
    both). A candidate whose distribution is the original's lands at 0 +- noise."""

    def __init__(self, reference: np.ndarray, floor: np.ndarray) -> None:
        pooled = np.concatenate([reference, floor]).astype(np.float64)
        self.mu, self.spread = pooled.mean(0), pooled.std(0)
        self.spread[self.spread == 0] = 1.0  # a constant feature: any change of it still shows
        self.reference = self._standardized(reference)
        self.floor = _centred(self._standardized(floor))
        self.reference_cov_term = frechet_distance(_centred(self.reference), self.floor)

    def _standardized(self, x: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(x, dtype=np.float64) - self.mu) / self.spread, -CLIP_SD, CLIP_SD)

    def __call__(self, candidate: np.ndarray) -> tuple[float, float]:
        c = self._standardized(candidate)
        n, dims = c.shape
        d = c - self.reference
        mean_term = float((d.mean(0) ** 2).sum() - d.var(0, ddof=1).sum() / n) / dims
        cov_term = (frechet_distance(_centred(c), self.floor) - self.reference_cov_term) / dims
        return mean_term, float(cov_term)


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(0)


def distribution_shift(reference: np.ndarray, floor: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """The distribution shift of one candidate (see ShiftBasis): `reference` and `candidate` are paired
    (same seeds and conditions, row for row); `floor` is the original on other seeds."""
    return ShiftBasis(reference, floor)(candidate)
