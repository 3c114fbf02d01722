"""The pass manager: validate a recipe completely before running anything, then run it."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from .errors import ConfigError
from .ir import DiffusionProgram, PassRecord
from .limits import MAX_CONFIG_INT
from .validate import number


@dataclass
class Context:
    """What a pass may use: the reference program, calibration data, an evaluator, device, RNG, progress."""

    reference: DiffusionProgram
    calibration: Any  # calibration.capture.Trajectories
    evaluate: Callable[[DiffusionProgram], dict[str, Any]]
    capabilities: frozenset[str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rng: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    progress: Callable[..., Iterable] = lambda it, **_: it
    config: Any = None  # the running pass's Config instance


def offline_context(
    reference: DiffusionProgram,
    calibration: Any,
    capabilities: frozenset[str] = frozenset({"fp32"}),
    progress: Callable[..., Iterable] = lambda it, **_: it,
) -> Context:
    """A context for running passes outside a job (the comparison commands): nothing evaluated per pass."""
    return Context(reference, calibration, lambda p: {}, capabilities, progress=progress)


@dataclass(frozen=True)
class PlannedPass:
    name: str
    module: ModuleType
    config: Any


def discover_passes() -> dict[str, ModuleType]:
    """Every module in the `passes` package, by its NAME."""
    import passes

    found = {}
    for info in pkgutil.iter_modules(passes.__path__):
        module = importlib.import_module(f"passes.{info.name}")
        found[getattr(module, "NAME", info.name)] = module
    return found


def build_config(module: ModuleType, name: str, values: dict[str, Any]) -> Any:
    cls = module.Config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"pass '{name}': unknown config key(s) {unknown} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        expected = hints[key]
        origin = typing.get_origin(expected) or expected
        if isinstance(origin, type) and (
            (not isinstance(value, origin) and not (origin is float and isinstance(value, int)))
            or (isinstance(value, bool) and origin is not bool)
        ):
            raise ConfigError(f"pass '{name}': {key} must be {expected}, got {value!r}")
        if origin in (int, float):
            number(value, f"pass '{name}': {key}", -MAX_CONFIG_INT, MAX_CONFIG_INT)
    return cls(**values)


def plan_passes(
    recipe: list[dict[str, Any]],
    capabilities: frozenset[str],
    registry: dict[str, ModuleType] | None = None,
    program: DiffusionProgram | None = None,
) -> list[PlannedPass]:
    """Resolve names and configs, and check ordering and capabilities, before anything runs; with
    `program`, also the checks a pass can make against the model (`check_program`)."""
    registry = discover_passes() if registry is None else registry
    planned = []
    for step in recipe:
        name = step.get("pass")
        if name not in registry:
            raise ConfigError(f"unknown pass '{name}' (known: {', '.join(sorted(registry)) or 'none'})")
        module = registry[name]
        missing = sorted(set(getattr(module, "REQUIRES", ())) - capabilities)
        if missing:
            raise ConfigError(f"pass '{name}' needs target capabilities {missing}, which this target lacks")
        config = build_config(module, name, step.get("config", {}))
        if hasattr(module, "check"):  # config-dependent checks, e.g. a format the target lacks
            module.check(config, capabilities)
        if program is not None and hasattr(module, "check_program"):
            module.check_program(config, program)
        planned.append(PlannedPass(name, module, config))
    position = {p.name: i for i, p in enumerate(planned)}
    for i, p in enumerate(planned):
        for other in getattr(p.module, "AFTER", ()):
            if other in position and position[other] > i:
                raise ConfigError(f"pass '{p.name}' must run after '{other}'")
        for other in getattr(p.module, "BEFORE", ()):
            if other in position and position[other] < i:
                raise ConfigError(f"pass '{p.name}' must run before '{other}'")
    return planned


def run_passes(program: DiffusionProgram, planned: list[PlannedPass], ctx: Context) -> DiffusionProgram:
    for p in planned:
        start = time.perf_counter()
        result = p.module.run(program, dataclasses.replace(ctx, config=p.config))
        if not isinstance(result, DiffusionProgram) or result is program:
            raise TypeError(f"pass '{p.name}' must return a new DiffusionProgram")
        seconds = time.perf_counter() - start
        record = PassRecord(p.name, dataclasses.asdict(p.config), ctx.evaluate(result), round(seconds, 3))
        program = result.replace(provenance=(*result.provenance, record))
    return program
