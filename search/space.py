"""A target's search space: knobs, each a named choice among recipe fragments, and the search's budgets.

A candidate recipe is one choice per knob, the fragments concatenated in knob order (the pass manager
orders them by phase). Trials run a cheap version of it: every pass's training budget (the config
fields the pass declares in `budgets`) scaled by `proxy_budget`; finalists run it as written.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from core.limits import MAX_SAMPLES
from core.validate import get, integer, number
from passes.manager import registry

MAX_TRIALS = 10_000


@dataclass(frozen=True)
class Knob:
    name: str
    choices: dict[str, list[dict[str, Any]]]  # choice -> recipe fragment (insertion order kept)


@dataclass(frozen=True)
class SearchSpace:
    knobs: tuple[Knob, ...]
    trials: int = 16  # evaluated candidates (all workers together)
    startup_trials: int = 6  # random candidates before TPE models the space
    finalists: int = 3  # fastest feasible trials re-run at full budget and verified, in order, until one passes
    proxy_budget: float = 0.25  # trials' training budgets, as a fraction of the recipe's
    proxy_samples: int = 50  # seeds the trials' distribution metrics (FD, agreement) are measured on
    latency_repeats: int = 5  # timed whole loops per trial (paired with the original's fp32 graph)
    # Candidates evaluated before TPE proposes any (Optuna's enqueue_trial): what the target's authors
    # expect to be good, so a short search cannot miss it; the search still has to beat it.
    first: tuple[dict[str, str], ...] = ()

    @property
    def size(self) -> int:
        return math.prod(len(k.choices) for k in self.knobs)

    def recipe(
        self, params: dict[str, str], budget: float = 1.0, budgets: dict[str, frozenset[str]] | None = None
    ) -> list[dict[str, Any]]:
        """The recipe of one choice per knob, as written; with `budget` < 1, the passes' training budgets
        scaled (`budgets`: pass name -> its budget fields; default: what the registered passes declare)."""
        scaled: dict[str, frozenset[str]] = {}
        if budget < 1:
            scaled = budgets if budgets is not None else {name: p.budgets for name, p in registry().items()}
        recipe = []
        for knob in self.knobs:
            for step in knob.choices[params[knob.name]]:
                step = copy.deepcopy(step)
                for name in scaled.get(step["pass"], ()):
                    if name in step.get("config", {}):
                        step["config"][name] = max(1, round(step["config"][name] * budget))
                recipe.append(step)
        return recipe

    def describe(self, params: dict[str, str]) -> str:
        return ", ".join(f"{k.name}={params[k.name]}" for k in self.knobs)


def parse_space(data: Any, where: str) -> SearchSpace:
    """The target's "search" object, every field type- and range-checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: 'search' must be an object")
    raw = get(data, "knobs", dict, where)
    if not raw:
        raise ConfigError(f"{where}: 'knobs' must name at least one knob")
    knobs = []
    for name, choices in raw.items():
        if not isinstance(choices, dict) or not choices:
            raise ConfigError(f"{where}: knob '{name}' must map choice names to recipe fragments")
        for choice, fragment in choices.items():
            if not isinstance(fragment, list) or not all(isinstance(s, dict) and "pass" in s for s in fragment):
                raise ConfigError(f"{where}: knob '{name}', choice '{choice}' must be a list of passes")
        knobs.append(Knob(name, dict(choices)))
    options: dict[str, Any] = {}
    for key, lo, hi in (
        ("trials", 1, MAX_TRIALS),
        ("startup_trials", 0, MAX_TRIALS),
        ("finalists", 1, 100),
        ("proxy_samples", 2, MAX_SAMPLES),
        ("latency_repeats", 1, 1000),
    ):
        if key in data:
            options[key] = integer(data[key], f"{where}: '{key}'", lo, hi)
    if "proxy_budget" in data:
        options["proxy_budget"] = number(data["proxy_budget"], f"{where}: 'proxy_budget'", 1e-3, 1.0)
    first = get(data, "first", list, where, [])
    for i, params in enumerate(first):
        if not isinstance(params, dict) or set(params) != {k.name for k in knobs}:
            raise ConfigError(f"{where}: first[{i}] must name one choice for every knob")
        for knob in knobs:
            if params[knob.name] not in knob.choices:
                raise ConfigError(f"{where}: first[{i}]: knob '{knob.name}' has no choice {params[knob.name]!r}")
    options["first"] = tuple(dict(p) for p in first)
    unknown = sorted(set(data) - {"knobs", "proxy_budget", *options})
    if unknown:
        raise ConfigError(f"{where}: unknown search key(s) {unknown}")
    return SearchSpace(tuple(knobs), **options)
