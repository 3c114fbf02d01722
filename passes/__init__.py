"""Optimization passes, one module each. The contract (checked by optimizer.pipeline):

- `NAME: str` and a `Config` dataclass (typed fields with defaults);
- `run(program, ctx) -> DiffusionProgram`: reads its Config from `ctx.config`, returns a new
  program and leaves its input untouched;
- optional ordering: `AFTER` / `BEFORE` (names of passes that, when present in the recipe, must
  run earlier / later) and `REQUIRES` (target capabilities, e.g. "fp8").

Passes never import each other.
"""
