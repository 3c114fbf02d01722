"""Typed, bounded reads of untrusted values (sidecars, targets, plan.json, CLI numbers).

Every reader raises the caller's error class with a one-line message naming where the value came from,
so a bad file or option never reaches code that would fail on it later with a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from core.errors import ConfigError, OptimizerError, one_line

MAX_JSON_BYTES = 16 << 20  # sidecars, targets and plans are small; a larger file is not one of them
_MISSING: Any = object()


def read_json_file(
    path: Path, error: type[OptimizerError] = ConfigError, what: str = "JSON", constants: bool = False
) -> Any:
    """Parse a UTF-8 JSON file of bounded size. NaN/Infinity literals are refused (they are not JSON) unless
    `constants`: a third-party config read as its own library reads it (Python's json accepts them)."""

    def refuse_constant(name: str) -> Any:
        if constants:
            return float(name)
        raise ValueError(f"{name} is not a JSON number")

    try:
        if not path.is_file():
            raise error(f"{path}: not a file")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path}: {path.stat().st_size:,} bytes is too large for a {what} file")
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON ({one_line(exc)})") from None


def read_json_object(
    path: Path, error: type[OptimizerError] = ConfigError, what: str = "JSON", constants: bool = False
) -> dict[str, Any]:
    data = read_json_file(path, error, what, constants)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """A JSON integer: an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def number(
    value: Any,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    error: type[OptimizerError] = ConfigError,
) -> float:
    """A finite number (JSON int or float) within [lo, hi]."""
    if not is_number(value) or not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    _check_range(value, name, lo, hi, error)
    return float(value)


def integer(
    value: Any,
    name: str,
    lo: int | None = None,
    hi: int | None = None,
    error: type[OptimizerError] = ConfigError,
) -> int:
    """An integer (not a bool, not a float) within [lo, hi]."""
    if not is_int(value):
        raise error(f"{name} must be an integer, got {value!r}")
    _check_range(value, name, lo, hi, error)
    return value


def _check_range(value: float, name: str, lo: float | None, hi: float | None, error: type[OptimizerError]) -> None:
    if lo is not None and value < lo:
        raise error(f"{name} must be >= {_bound(lo)}, got {value!r}")
    if hi is not None and value > hi:
        raise error(f"{name} must be <= {_bound(hi)}, got {value!r}")


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def of_type(value: Any, kind: type | tuple[type, ...], name: str, error: type[OptimizerError] = ConfigError) -> Any:
    kinds = _kinds(kind)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(_type_name(k) for k in kinds)
        raise error(f"{name} must be {expected}, got {value!r}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(
        kind, kind.__name__
    )


def get(
    data: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    default: Any = _MISSING,
    error: type[OptimizerError] = ConfigError,
) -> Any:
    """`data[key]` checked to be of `kind`; a missing key is `default`, or an error when there is none."""
    if key not in data:
        if default is _MISSING:
            raise error(f"{where}: missing '{key}'")
        return default
    return of_type(data[key], kind, f"{where}: '{key}'", error)


def string_list(value: Any, name: str, error: type[OptimizerError] = ConfigError) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise error(f"{name} must be a list of strings, got {value!r}")
    return value


def finite_tree(value: Any, name: str, error: type[OptimizerError] = ConfigError) -> None:
    """Refuse NaN/Inf anywhere inside nested lists/dicts (configs handed to diffusers)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{name} must be finite, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            finite_tree(v, f"{name}.{k}", error)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            finite_tree(v, f"{name}[{i}]", error)
