"""core.attention: the replacements compute what they claim (against plain formulas), a local window
covering the whole grid is softmax attention, and every one lowers to standard ONNX ops that ORT runs
like torch."""

import copy

import onnx
import pytest
import torch

from backends.onnx_export import export_onnx
from backends.ort import OrtDenoiser
from core.adapters import torch_denoise
from core.attention import GridAttention, LinearAttention, LocalAttention
from core.errors import ConfigError
from core.flops import count_flops


def qkv(n=64, heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, n, d, generator=g) for _ in range(3)]


def test_linear_attention_is_the_normalized_kernel_formula():
    q, k, v = qkv()
    for name, phi in (("relu", torch.relu), ("elu", lambda x: torch.nn.functional.elu(x) + 1)):
        fq, fk = phi(q), phi(k)
        weights = fq @ fk.transpose(-2, -1)  # [b, h, n, n]: the quadratic form of the same thing
        expected = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(LinearAttention((8, 8), name).mix(q, k, v), expected, rtol=1e-4, atol=1e-5)
    conv = LinearAttention((8, 8), "relu", conv=True, channels=16)
    torch.testing.assert_close(conv.mix(q, k, v), LinearAttention((8, 8)).mix(q, k, v))  # zero-initialized branch
    with pytest.raises(ConfigError, match="feature map 'tanh'"):
        LinearAttention((8, 8), "tanh")


def test_local_attention_is_softmax_within_the_window():
    q, k, v = qkv(n=64)
    local = LocalAttention((8, 8), radius=2.0, tile=4)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], -1).float()
    inside = torch.cdist(pos, pos) <= 2.0
    scores = (q @ k.transpose(-2, -1)) / 8**0.5
    expected = torch.softmax(scores.masked_fill(~inside, float("-inf")), -1) @ v
    torch.testing.assert_close(local.mix(q, k, v), expected, rtol=1e-4, atol=1e-5)
    # A window over the whole grid is softmax attention itself.
    whole = LocalAttention((8, 8), radius=12.0, tile=4)
    torch.testing.assert_close(whole.mix(q, k, v), GridAttention((8, 8)).mix(q, k, v), rtol=1e-4, atol=1e-5)
    assert whole.keys_per_query == 12**2  # the halo stops where it could only add padding: 4 + 2 * (8 - 4)
    assert local.keys_per_query == (4 + 2 * 2) ** 2  # a 4x4 tile's halo
    with pytest.raises(ConfigError, match="radius"):
        LocalAttention((8, 8), radius=0.5)


def test_local_attention_costs_fewer_flops_on_large_grids():
    q, k, v = qkv(n=32 * 32, heads=1, d=8)
    softmax = count_flops(GridAttention((32, 32)).mix, q, k, v)
    local = count_flops(LocalAttention((32, 32), radius=4.0).mix, q, k, v)
    assert local < softmax * (16 * 16) / (32 * 32) * 1.01  # (8 + 2*4)^2 = 256 keys per query instead of 1024


def test_replacements_lower_to_standard_ops_that_ort_runs_like_torch(tiny_digits_program, tmp_path):
    """One graph with both mechanisms: block 0 local attention, block 1 linear attention (elu + 1) with a
    trained-looking depthwise-conv branch (not the zero start)."""
    program = tiny_digits_program
    model = copy.deepcopy(program.denoiser).eval()
    assert len(model.transformer_blocks) == 2
    side = program.spec.sample_shape[-1] // model.config.patch_size
    width = model.config.num_attention_heads * model.config.attention_head_dim
    linear = LinearAttention((side, side), "elu", conv=True, channels=width)
    torch.nn.init.normal_(linear.conv.weight, std=0.1)
    model.transformer_blocks[0].attn1.set_processor(LocalAttention((side, side), radius=2.0, tile=4))
    model.transformer_blocks[1].attn1.set_processor(linear)
    program = program.replace(denoiser=model)
    path = export_onnx(model, program.spec, tmp_path / "g.onnx")
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)  # no custom ops
    assert "Gather" in ops and ops.count("Softmax") == 1 and ops.count("Conv") == 2  # + the patch embedding
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *program.spec.sample_shape, generator=g), torch.tensor([900.0, 100.0])
    y = {"class_labels": torch.tensor([3, 7])}
    torch.testing.assert_close(OrtDenoiser(path)(x, t, y), torch_denoise(program)(x, t, y), rtol=1e-3, atol=1e-4)


def test_a_replacement_refuses_inputs_it_would_drop():
    """Rotary positions (Flux, SD3.5, Wan) reach attention as an argument: a processor that ignored them
    would change the network silently, so it refuses them (issue 34)."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=8, heads=2, dim_head=4)
    attn.set_processor(LinearAttention((2, 2), "relu", False, 8))
    x = torch.randn(1, 4, 8)
    assert attn(x).shape == (1, 4, 8)
    with pytest.raises(ConfigError, match="LinearAttention does not apply image_rotary_emb; it would drop them"):
        attn.processor(attn, x, image_rotary_emb=(torch.ones(4, 4), torch.zeros(4, 4)))
