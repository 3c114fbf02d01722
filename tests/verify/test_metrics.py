"""Item 7: the metrics against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from verify.gates import evaluate_gates, gates_table
from verify.metrics import frechet_distance, psnr, relative_error, ssim


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


def test_gates_pass_fail_and_not_applicable():
    results = evaluate_gates(
        {"min_psnr_db": 60, "max_eps_rel_error": 1e-3, "max_fd_increase": 1.0},
        {"psnr_db_mean": 59.0, "eps_rel_error_max": 1e-4},
    )
    assert [r.passed for r in results] == [False, True, None]
    table = gates_table(results)
    assert "FAIL" in table and "pass" in table and "skipped (n/a)" in table
