"""Targets are data files (optimizer/targets/*.json): hardware capabilities, backend, recipe, gates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .gates import check_gate_names

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

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(self.hardware.get("capabilities", ()))


def parse_target(data: dict[str, Any], where: str) -> Target:
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{where}: target is missing {missing}")
    if not isinstance(data["recipe"], list) or not all(isinstance(s, dict) and "pass" in s for s in data["recipe"]):
        raise ConfigError(f"{where}: recipe must be a list of {{'pass': NAME, 'config': {{...}}}}")
    check_gate_names(data["gates"], where)
    return Target(**{k: data[k] for k in (*REQUIRED, "planned_in") if k in data})


def list_targets() -> list[Target]:
    return [parse_target(json.loads(p.read_text()), str(p)) for p in sorted(TARGETS_DIR.glob("*.json"))]


def get_target(name_or_path: str) -> Target:
    """A shipped target by name, or a target JSON file of the user's."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        try:
            return parse_target(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
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
