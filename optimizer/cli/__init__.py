"""`optimize MODEL --target T --out DIR`, plus `inspect`, `targets`, `calibrate`, `sample`, `bench`, the
comparisons: the group (app) and one module per family of commands, each registering its commands on import."""

from optimizer.cli import compare, info, run, sampling, serving, timing
from optimizer.cli.app import main

__all__ = ["compare", "info", "main", "run", "sampling", "serving", "timing"]
