"""Plug-in discovery: one module per plug-in (a pass, a backend, a family adapter), found by scanning
its package, so adding one is adding a file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Collection
from typing import Any


def module_members(package: str, attribute: str, skip: Collection[str] = ()) -> dict[str, Any]:
    """`attribute` of every module of `package` but `skip`, by module name (None where it is missing)."""
    found = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name not in skip:
            found[info.name] = getattr(importlib.import_module(f"{package}.{info.name}"), attribute, None)
    return found
