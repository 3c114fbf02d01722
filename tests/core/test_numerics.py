"""Issue 3: the low-precision formats against hand-computed values (and modelopt where it runs on CPU)."""

import pytest
import torch

from core import numerics as nx


def test_fp4_rounding_hand_values():
    x = torch.tensor([0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.75, -2.6, 0.0])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -3.0, 0.0])
    # ties go to the even mantissa: 0.75 -> 1 (not 0.5), 1.25 -> 1, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    assert torch.equal(nx.round_fp4(x), want)


def test_fp8_rounding_hand_values():
    x = torch.tensor([1.0625, 1.1875, 500.0, -500.0, 0.001, -3.3, 0.3])
    # E4M3: step 1/8 in [1, 2) (ties to even), saturates at 448, smallest subnormal 2^-9
    want = torch.tensor([1.0, 1.25, 448.0, -448.0, 2.0**-9, -3.25, 0.3125])
    assert torch.equal(nx.round_fp8(x), want)


def test_int8_weight_per_channel_hand_values():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.1, 0.2, -0.4]])
    deq, scales = nx.fake_int8_weight(w)
    assert torch.allclose(scales, torch.tensor([1 / 127, 0.4 / 127]))
    # row 0: 127, -63.5 -> -64 (half to even), 31.75 -> 32
    assert torch.allclose(deq[0], torch.tensor([127, -64, 32]) / 127)
    assert torch.allclose(deq[1], torch.tensor([32, 64, -127]) * 0.4 / 127)  # 31.75 -> 32, 63.5 -> 64


def test_uint8_params_hand_values():
    scale, zero = nx.uint8_params(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zero == 64  # round(63.75)
    scale, zero = nx.uint8_params(0.5, 2.0)  # the range is widened to hold 0
    assert scale == pytest.approx(2 / 255) and zero == 0
    x = torch.tensor([-1.0, 0.0, 3.0, 5.0])
    q = nx.fake_int(x, torch.tensor(4 / 255), torch.tensor(64.0), 0, 255)
    assert q[1] == 0 and torch.allclose(q[[0, 2]], torch.tensor([-64, 191]) * 4 / 255)
    assert torch.isclose(q[3], torch.tensor(191 * 4 / 255))  # saturates at 255


def test_int4_blocks_hand_values():
    w = torch.tensor([[7.0, -3.5, 1.0, 0.0, 0.7, 0.1, -0.35, 0.05]])
    deq, scales = nx.fake_int4_blocks(w, 4)
    assert torch.allclose(scales, torch.tensor([[1.0, 0.1]]))
    # block 0: -3.5 -> -4 (half to even); block 1: 1, -3.5 -> -4, 0.5 -> 0
    assert torch.allclose(deq, torch.tensor([[7.0, -4.0, 1.0, 0.0, 0.7, 0.1, -0.4, 0.0]]))
    with pytest.raises(ValueError, match="multiple of the block size"):
        nx.fake_int4_blocks(torch.ones(1, 6), 4)


def test_nvfp4_two_level_scales_hand_values():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([6.0, 3.0, 1.4, 0.1])
    x[0, 16:18] = torch.tensor([0.9, 0.5])
    deq, block_scales = nx.fake_nvfp4(x, torch.tensor(0.5))
    # block 0: amax 6 -> E4M3 scale 6 / (6 * 0.5) = 2 -> step 1: 6, 3, 1.4 -> 1.5, 0.1 -> 0
    # block 1: amax 0.9 -> 0.9 / 3 = 0.3 -> E4M3 0.3125 -> step 0.15625: 0.9 -> 6 steps, 0.5 -> 3.2 -> 3 steps
    assert torch.allclose(block_scales, torch.tensor([[2.0, 0.3125]]))
    assert torch.allclose(deq[0, :4], torch.tensor([6.0, 3.0, 1.5, 0.0]))
    assert torch.allclose(deq[0, 16:18], torch.tensor([0.9375, 0.46875]))
    assert torch.count_nonzero(deq) == 5


def test_nvfp4_default_tensor_scale_and_zero_blocks():
    x = torch.cat([torch.zeros(16), torch.linspace(-3, 3, 16)]).reshape(1, 32)
    deq, scales = nx.fake_nvfp4(x)
    assert torch.equal(deq[0, :16], torch.zeros(16)) and scales[0, 0] == 0
    # step = amax / 6 = 0.5; the error is at most half the largest FP4 gap (4 -> 6) in steps
    assert (deq - x).abs().max() <= (6 - 4) / 2 * 0.5 + 1e-6


def test_matches_modelopt_on_cpu():
    tq = pytest.importorskip("modelopt.torch.quantization.tensor_quant")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    amax = w.abs().amax(dim=1, keepdim=True)
    ours, _ = nx.fake_int8_weight(w)
    assert torch.allclose(tq.fake_tensor_quant(w, amax, None, 8, False, True), ours, atol=1e-6)
    x = torch.randn(1000, generator=g) * 3
    amax = x.abs().amax()
    assert torch.allclose(tq.scaled_e4m3(x, amax, None, 4, 3), nx.fake_fp8(x, nx.fp8_scale(amax)), atol=1e-6)
