"""backends.graph_memo: an export identical to an earlier one gets its graph without a second trace; anything a
forward pass could tell apart gives another key, and what the key cannot describe gives none (tiny random
DiT: mechanics)."""

import functools

import pytest
import torch
from helpers import tiny_dit

from backends import graph_memo
from backends.onnx_export import export_graph

ARGS = (torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))
NAMES, OUTPUTS = ["sample", "timestep", "class_labels"], ["model_output"]


def key(module, args=ARGS, names=NAMES, opset=18):
    return graph_memo.graph_key(module, args, names, OUTPUTS, opset)


class Denoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, labels):
        return self.model(x, t, class_labels=labels).sample


def test_a_second_identical_export_is_the_first_graph_without_a_trace(tmp_path, monkeypatch):
    graph_memo.clear()
    first = export_graph(Denoiser(tiny_dit()), ARGS, NAMES, OUTPUTS, tmp_path / "a.onnx")

    def no_trace(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(torch.onnx, "export", no_trace)
    second = export_graph(Denoiser(tiny_dit()), ARGS, NAMES, OUTPUTS, tmp_path / "b.onnx")  # a new, equal module
    assert second.read_bytes() == first.read_bytes()
    other = Denoiser(tiny_dit())
    with torch.no_grad():
        other.model.proj_out_2.bias.add_(1.0)
    with pytest.raises(Exception, match="traced again"):  # other weights: traced
        export_graph(other, ARGS, NAMES, OUTPUTS, tmp_path / "c.onnx")
    graph_memo.clear()


def test_what_a_forward_pass_could_tell_apart_changes_the_key():
    base = key(Denoiser(tiny_dit()))
    assert base is not None and key(Denoiser(tiny_dit())) == base
    assert key(Denoiser(tiny_dit()), args=(torch.zeros(2, 1, 16, 16), *ARGS[1:])) != base
    assert key(Denoiser(tiny_dit()), names=["x", "t", "y"]) != base
    assert key(Denoiser(tiny_dit()), opset=19) != base

    model = Denoiser(tiny_dit())
    model.model.transformer_blocks[0].attn1.scale = 0.5  # a plain attribute the attention reads
    assert key(model) != base
    model = Denoiser(tiny_dit())
    model.model.transformer_blocks[1].attn1.processor.window = 3  # an attribute object's field
    assert key(model) != base
    model = Denoiser(tiny_dit())
    model.model.register_buffer("extra", torch.ones(1))
    assert key(model) != base
    model = Denoiser(tiny_dit())
    layer = model.model.proj_out_2
    model.model.proj_out_2 = OtherLinear(layer.in_features, layer.out_features)  # another class, same weights
    model.model.proj_out_2.load_state_dict(layer.state_dict())
    assert key(model) != base


class OtherLinear(torch.nn.Linear):
    pass


@pytest.mark.parametrize(
    "spoil",
    [
        lambda m: m.model.register_forward_hook(lambda *a: None),  # a hook runs code the key cannot see
        lambda m: setattr(m.model, "gate", lambda x: x * 2),  # a function held on a module
        lambda m: setattr(m.model, "gate", functools.partial(max, 0)),
        lambda m: setattr(m.model, "gate", torch.zeros(2).to_sparse()),
    ],
    ids=["hook", "lambda", "partial", "sparse"],
)
def test_what_the_key_cannot_describe_gives_no_key(spoil):
    model = Denoiser(tiny_dit())
    spoil(model)
    assert key(model) is None


def test_weights_larger_than_a_kept_graph_give_no_key(monkeypatch):
    monkeypatch.setattr(graph_memo, "MAX_GRAPH_BYTES", 1000)
    assert key(Denoiser(tiny_dit())) is None


def test_the_memo_keeps_the_most_recent_graphs_within_its_bytes(monkeypatch):
    graph_memo.clear()
    monkeypatch.setattr(graph_memo, "MAX_BYTES", 10)
    graph_memo.keep("a", b"1234")
    graph_memo.keep("b", b"1234")
    assert graph_memo.recall("a") == b"1234"  # used: now the most recent
    graph_memo.keep("c", b"1234")
    assert graph_memo.recall("b") is None and graph_memo.recall("a") and graph_memo.recall("c")
    graph_memo.keep("d", b"x" * 11)  # larger than the whole memo: not kept, and nothing else goes for it
    assert graph_memo.recall("d") is None and graph_memo.recall("a") and graph_memo.recall("c")
    graph_memo.clear()
