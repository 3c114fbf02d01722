"""The quantize pass's algorithms (not passes): activation ranges, SmoothQuant, the error budgets and greedy
fallback, per-layer formats by integer programming. passes/quantize.py is the pass: its contract and the order
it runs them in."""
