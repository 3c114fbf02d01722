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


def _gaussian(n: int, dims: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dims))


def test_the_distribution_shift_is_zero_for_the_original_and_free_of_the_feature_scale():
    from verify.metrics import distribution_shift

    reference, floor = _gaussian(200, 16, 0), _gaussian(200, 16, 1)
    assert distribution_shift(reference, floor, reference) == (0.0, 0.0)
    candidate = reference + 0.3
    scaled = distribution_shift(1000 * reference, 1000 * floor, 1000 * candidate)
    assert scaled == pytest.approx(distribution_shift(reference, floor, candidate), rel=1e-9)


@pytest.mark.parametrize("n", [100, 1000])
def test_a_mean_shift_measures_the_same_at_any_sample_count_where_the_ratio_grows(n):
    """N(0, I) features, the candidate every sample + 0.3: a true Fréchet distance of 0.09 per feature.
    The shift measures it at 100 and at 1000 samples; the FD ratio to the floor grows with n (the floor
    is FD's 1/n bias), which is why it is not the gated value."""
    from verify.judges.base import FloorFD
    from verify.metrics import distribution_shift

    reference, floor = _gaussian(n, 16, 2), _gaussian(n, 16, 3)
    mean_term, cov_term = distribution_shift(reference, floor, reference + 0.3)
    assert mean_term == pytest.approx(0.09, rel=0.1) and abs(cov_term) < 0.01
    ratio = FloorFD("x", reference, floor)(reference + 0.3)["x_ratio"]
    assert (ratio < 2.0) if n == 100 else (ratio > 5.0)  # measured: 1.34 and 9.8


def test_an_unpaired_draw_of_the_same_distribution_is_near_zero_and_a_wider_one_shows_in_the_covariance():
    from verify.metrics import distribution_shift

    reference, floor, fresh = _gaussian(1000, 16, 4), _gaussian(1000, 16, 5), _gaussian(1000, 16, 6)
    assert abs(sum(distribution_shift(reference, floor, fresh))) < 0.02  # no tracking of the seeds needed
    mean_term, cov_term = distribution_shift(reference, floor, 1.5 * reference)  # sd 1.5: (1.5 - 1)^2 = 0.25
    assert abs(mean_term) < 0.01 and 0.15 < cov_term < 0.3
