"""Targets are data files (optimizer/targets/*.json): hardware capabilities, backend, recipe, gates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.ir import DiffusionProgram
from core.validate import finite_tree, get, read_json_file, read_json_object, string_list
from search.space import SearchSpace, parse_space
from verify.gates import check_gate_names

TARGETS_DIR = Path(__file__).parent / "targets"
REQUIRED = ("name", "status", "description", "hardware", "backend", "recipe", "gates")


@dataclass(frozen=True)
class Target:
    name: str
    status: str  # "available" | "planned"
    description: str
    hardware: dict[str, Any]
    backend: dict[str, Any]
    recipe: list[dict[str, Any]]
    gates: dict[str, float]
    planned_in: str | None = None
    # Other recipes to try beside `recipe`: the job runs each and keeps the one whose samples on the
    # calibration seeds stay closest to the original's (end-to-end PSNR), e.g. whether dropping guidance
    # or caching more spends a FLOPs budget better on this model.
    alternatives: tuple[list[dict[str, Any]], ...] = ()
    # A search space (`*-auto` targets): the job searches the recipe instead of running `recipe`.
    search: SearchSpace | None = None
    search_data: dict[str, Any] | None = None  # as written, for naming the study
    # The space a policy's search runs instead (its loop knobs differ: sampler, warm starts), if any.
    policy_search: SearchSpace | None = None
    policy_search_data: dict[str, Any] | None = None

    def space_for(self, program: DiffusionProgram) -> tuple[SearchSpace | None, dict[str, Any] | None]:
        """The search space for `program` and its data as written: a policy's own where the target has one."""
        if self.policy_search is not None and program.spec.chunking is not None:
            return self.policy_search, self.policy_search_data
        return self.search, self.search_data

    @property
    def recipes(self) -> tuple[list[dict[str, Any]], ...]:
        return (self.recipe, *self.alternatives)

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(self.hardware.get("capabilities", ()))


def parse_target(data: Any, where: str) -> Target:
    """Every field checked for type (and gates for finiteness) before anything reads it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a target is a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{where}: target is missing {missing}")
    for key in ("name", "status", "description"):
        get(data, key, str, where)
    if data["status"] not in ("available", "planned"):
        raise ConfigError(f"{where}: status must be 'available' or 'planned', got {data['status']!r}")
    get(data, "planned_in", (str, type(None)), where, None)
    hardware, backend = get(data, "hardware", dict, where), get(data, "backend", dict, where)
    string_list(hardware.get("capabilities", []), f"{where}: hardware.capabilities")
    from backends.registry import names

    if get(backend, "name", str, f"{where}: backend") not in names():
        raise ConfigError(f"{where}: unknown backend {backend['name']!r} (known: {', '.join(names())})")
    string_list(backend.get("providers", []), f"{where}: backend.providers")
    _check_recipe(get(data, "recipe", list, where), f"{where}: recipe")
    alternatives = get(data, "alternatives", list, where, [])
    for i, recipe in enumerate(alternatives):
        if not isinstance(recipe, list):
            raise ConfigError(f"{where}: alternatives[{i}] must be a recipe (a list of passes)")
        _check_recipe(recipe, f"{where}: alternatives[{i}]")
    check_gate_names(get(data, "gates", dict, where), where)
    search_data = get(data, "search", dict, where, None)
    search = None if search_data is None else _space(search_data, f"{where}: search")
    policy_data = get(data, "policy_search", dict, where, None)
    policy = None if policy_data is None else _space(policy_data, f"{where}: policy_search")
    if search_data is not None and (data["recipe"] or alternatives):
        raise ConfigError(f"{where}: a target with a search space has an empty recipe and no alternatives")
    if policy is not None and search is None:
        raise ConfigError(f"{where}: 'policy_search' is a policy's space beside 'search'; give 'search' too")
    fields = {k: data[k] for k in (*REQUIRED, "planned_in") if k in data}
    return Target(
        **fields,
        alternatives=tuple(alternatives),
        search=search,
        search_data=search_data,
        policy_search=policy,
        policy_search_data=policy_data,
    )


def _space(data: dict[str, Any], where: str) -> SearchSpace:
    space = parse_space(data, where)
    for knob in space.knobs:
        for choice, fragment in knob.choices.items():
            _check_recipe(fragment, f"{where}.knobs.{knob.name}.{choice}")
    return space


def _check_recipe(recipe: list[Any], where: str) -> None:
    for i, step in enumerate(recipe):
        if not isinstance(step, dict) or not isinstance(step.get("pass"), str):
            raise ConfigError(f"{where}[{i}] must be {{'pass': NAME, 'config': {{...}}}}")
        finite_tree(get(step, "config", dict, f"{where}[{i}]", {}), f"{where}[{i}].config")


def list_targets() -> list[Target]:
    return [parse_target(read_json_object(p, what="target"), str(p)) for p in sorted(TARGETS_DIR.glob("*.json"))]


def target_file(name_or_path: str) -> Path | None:
    """The user's target file when `name_or_path` names one (a .json path), else None (a shipped name)."""
    path = Path(name_or_path)
    return path if path.suffix == ".json" else None


def get_target(name_or_path: str) -> Target:
    """A shipped target by name, or a target JSON file of the user's."""
    path = target_file(name_or_path)
    if path is not None:
        if not path.exists():
            raise ConfigError(f"target file {path}: no such file")
        return parse_target(read_json_file(path, what="target"), str(path))
    shipped = {t.name: t for t in list_targets()}
    if name_or_path not in shipped:
        raise ConfigError(f"unknown target '{name_or_path}' (known: {', '.join(shipped)})")
    return shipped[name_or_path]


def require_available(target: Target) -> None:
    if target.status != "available":
        ready = ", ".join(t.name for t in list_targets() if t.status == "available")
        raise ConfigError(
            f"target '{target.name}' is declared but not implemented yet ({target.planned_in or target.status}); "
            f"available now: {ready}"
        )
