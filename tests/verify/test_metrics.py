"""Item 7: the metrics against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from verify.metrics import frechet_distance, psnr, psnr_per_frame, relative_error, ssim, ssim_per_channel


def test_psnr_hand_value():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.1  # mse 0.01 -> 20 dB
    b[1, 0, 0, 0] = 0.5  # mse 0.25/16 -> 10*log10(64) dB
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 10 * math.log10(64)]))
    assert psnr(a, a)[0] == 200.0  # identical: capped


def test_ssim_of_constant_images_matches_the_formula():
    # Constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    c1 = 0.01**2
    got = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)


def test_ssim_properties():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16)
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(3))
    torch.testing.assert_close(ssim(x, noisy), ssim(noisy, x))
    assert (ssim(x, noisy) < 1).all() and (ssim(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1)) < ssim(x, noisy)).all()


def test_frechet_distance_closed_form():
    # Isotropic Gaussians: FD = |mu_a - mu_b|^2 + d * (s_a - s_b)^2.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200_000, 2))
    b = 3.0 * rng.standard_normal((200_000, 2)) + np.array([1.0, 2.0])
    assert frechet_distance(a, b) == pytest.approx(5.0 + 2 * (3.0 - 1.0) ** 2, rel=0.01)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, torch.tensor([3.0, 4.5])) == pytest.approx(0.1)


def test_ssim_reads_video_per_frame_and_1d_signals_with_a_window_that_fits():
    torch.manual_seed(0)
    frames = torch.rand(2, 3, 4, 12, 12)
    noisy = (frames + 0.1 * torch.randn_like(frames)).clamp(0, 1)
    per_frame = torch.stack([ssim_per_channel(frames[:, :, f], noisy[:, :, f]) for f in range(4)]).mean(0)
    torch.testing.assert_close(ssim_per_channel(frames, noisy), per_frame)  # video: the frames' mean
    tiny = torch.rand(1, 1, 4, 4)  # smaller than the 7-wide window: it shrinks to 3
    assert ssim(tiny, tiny).item() == pytest.approx(1.0) and ssim(tiny, 1 - tiny).item() < 0.5
    signal = torch.rand(2, 2, 32)
    assert torch.allclose(ssim(signal, signal), torch.ones(2))
    assert (ssim(signal, (signal + 0.2 * torch.randn_like(signal)).clamp(0, 1)) < 0.95).all()


def test_psnr_per_frame_is_the_mean_of_the_frames():
    a = torch.zeros(1, 1, 2, 4, 4)
    b = a.clone()
    b[:, :, 0] += 0.1  # frame 0: 20 dB; frame 1 identical: capped at 200
    assert psnr_per_frame(a, b).item() == pytest.approx((20.0 + 200.0) / 2)


def test_frechet_distance_with_fewer_samples_than_dimensions_equals_the_matrix_square_root():
    """The low-rank path (singular values of the cross-product) against scipy's sqrtm of C_a C_b."""
    import warnings

    from scipy import linalg

    rng = np.random.default_rng(1)
    mix = rng.standard_normal((300, 300))
    a, b = 0.1 * rng.standard_normal((40, 300)) @ mix, 0.1 * rng.standard_normal((60, 300)) @ mix + 0.05
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
