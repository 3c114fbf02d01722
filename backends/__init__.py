"""Backends: lower a program to artifacts, run them, describe themselves (backends.registry).

One module per backend defines `BACKEND`, a factory taking the target's "backend" options; the
registry finds it by its `name`. Shared by every ONNX-based backend: onnx_export/qdq (graphs),
lowering (one graph per variant + plan.json), plan (plan.json schema) and runner (the loop).
"""
