"""Optimization passes, one module each, plus the infrastructure that runs them.

- `base`: the contract. A pass module defines `PASS = Pass(name, phase, Config, run, requires,
  invalidates, ...)`; `run(program, config, ctx)` returns `PassResult(new_program, decision)`, where
  the decision is a typed `core.ir.Decision` that renders the pass's report section.
- `analyses`: calibration trajectories and FLOPs, cached by fingerprint, recomputed when invalidated.
- `manager`: finds the passes, checks a recipe completely before anything runs, orders it by phase.

Passes never import each other (tests/test_architecture.py checks it).
"""
