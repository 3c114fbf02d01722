"""Graphs exported once per process. An export whose inputs are identical to an earlier one's (the same module
classes, attributes, weights and buffers, example shapes, input and output names, opset) gets that graph again
instead of a second trace: a pipeline's prompt encoder and decoder are exported with every candidate (each of a
search's trials, a job's fp32 baseline) and never change, nor does the original denoiser.

The key covers everything torch.export reads from the module that can differ between two modules of one
class: every submodule's type and instance attributes (plain values, tensors by content, attribute objects such
as attention processors by their type and fields), parameters and buffers by content. Anything it cannot
describe for certain (hooks, functions or closures stored on a module, objects without fields, cycles, too much
nesting) gives no key, and that export runs as it would without the memo. Only dynamo exports are kept (they
read example inputs' shapes, never their values); graphs are kept up to MAX_GRAPH_BYTES each, MAX_BYTES in all,
least recently used first out.
"""

from __future__ import annotations

import enum
import hashlib
import types
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

MAX_GRAPH_BYTES = 64 << 20
MAX_BYTES = 256 << 20
MAX_DEPTH = 6  # nesting of attribute objects described in a key

_graphs: OrderedDict[str, bytes] = OrderedDict()


class _Undescribable(Exception):
    """A value the key cannot describe for certain: no key, no memo."""


def graph_key(
    module: nn.Module, args: Sequence[torch.Tensor], names: Sequence[str], outputs: Sequence[str], opset: int
) -> str | None:
    """The memo key of a dynamo export of `module(*args)`, or None when the module holds something the key
    cannot describe (or weights too large for a graph to be kept)."""
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if weights > MAX_GRAPH_BYTES or _global_hooks():
        return None
    h = hashlib.blake2b(digest_size=20)
    try:
        _describe_module(module, h, depth=0, seen=set())
        for arg in args:
            if not isinstance(arg, torch.Tensor):
                return None
            h.update(f"arg {arg.dtype} {tuple(arg.shape)}\n".encode())
    except Exception:  # _Undescribable, or e.g. a tensor type whose bytes cannot be read: no key
        return None
    h.update(f"names {list(names)} outputs {list(outputs)} opset {opset}".encode())
    return h.hexdigest()


def recall(key: str | None) -> bytes | None:
    if key is None or key not in _graphs:
        return None
    _graphs.move_to_end(key)
    return _graphs[key]


def keep(key: str | None, graph: bytes) -> None:
    if key is None or len(graph) > min(MAX_GRAPH_BYTES, MAX_BYTES):
        return
    _graphs[key] = graph
    _graphs.move_to_end(key)
    while sum(len(g) for g in _graphs.values()) > MAX_BYTES:
        _graphs.popitem(last=False)


def clear() -> None:
    _graphs.clear()


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_module_registration_hooks")
    return any(getattr(m, name, None) for name in hooks)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _describe_module(module: nn.Module, h: Any, depth: int, seen: set[int]) -> None:
    """Every submodule of `module`: its path, type and instance attributes."""
    for path, sub in module.named_modules(remove_duplicate=False):
        h.update(f"module {path} {_qualname(type(sub))}\n".encode())
        fields = vars(sub)
        if any(fields.get(name) for name in FORWARD_HOOKS):
            raise _Undescribable  # a hook runs code the key cannot see
        for name in sorted(fields):
            if name == "_modules":  # described by named_modules
                h.update(repr([(k, _qualname(type(v))) for k, v in fields[name].items()]).encode())
            elif not (name.startswith("_") and name.endswith("hooks")):  # state-dict hooks: not run by forward
                h.update(f"{name}=".encode())
                _describe(fields[name], h, depth, seen)


def _describe(value: Any, h: Any, depth: int, seen: set[int]) -> None:
    """Feed `value` into `h` so that values a forward pass could tell apart give different bytes."""
    if depth > MAX_DEPTH:
        raise _Undescribable
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, torch.Tensor):
        _describe_tensor(value, h)
    elif isinstance(value, torch.dtype | torch.device | torch.Size | torch.memory_format | torch.layout):
        h.update(f"{type(value).__name__}:{value};".encode())
    elif isinstance(value, enum.Enum):
        h.update(f"enum:{_qualname(type(value))}.{value.name};".encode())
    elif id(value) in seen:  # met before in this key (a shared config, a cycle): described there
        h.update(f"seen:{_qualname(type(value))};".encode())
    elif isinstance(value, nn.Module):  # a module held outside _modules: described in full here
        seen.add(id(value))
        h.update(b"module{")
        _describe_module(value, h, depth + 1, seen)
        h.update(b"}")
    elif isinstance(value, dict):
        h.update(f"dict{len(value)}{{".encode())
        for key in sorted(value, key=repr):
            h.update(f"{key!r}=".encode())
            _describe(value[key], h, depth + 1, seen)
        h.update(b"}")
    elif isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        h.update(f"{type(value).__name__}{len(value)}[".encode())
        for item in items:
            _describe(item, h, depth + 1, seen)
        h.update(b"]")
    elif isinstance(value, types.FunctionType) and value.__closure__ is None and "<" not in value.__qualname__:
        h.update(f"function:{value.__module__}.{value.__qualname__};".encode())
    elif isinstance(value, type):
        h.update(f"type:{_qualname(value)};".encode())
    elif _plain_object(value):  # e.g. an attention processor, a config: its class and fields
        seen.add(id(value))
        h.update(f"object:{_qualname(type(value))}".encode())
        _describe(vars(value), h, depth + 1, seen)
    else:  # functions with state, bound methods, partials, objects without fields
        raise _Undescribable


def _plain_object(value: Any) -> bool:
    """An instance of a Python class whose state is all in its __dict__."""
    cls = type(value)
    if cls.__module__ in ("builtins", "functools") or isinstance(value, types.MethodType | types.BuiltinFunctionType):
        return False
    return hasattr(value, "__dict__") and not any(getattr(c, "__slots__", ()) for c in cls.__mro__[:-1])


def _describe_tensor(t: torch.Tensor, h: Any) -> None:
    if t.is_sparse or t.device.type == "meta" or type(t) not in (torch.Tensor, nn.Parameter):
        raise _Undescribable
    h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:{t.requires_grad};".encode())
    data = t.detach().cpu().contiguous().reshape(-1)
    if data.numel():
        h.update(data.view(torch.uint8).numpy())
