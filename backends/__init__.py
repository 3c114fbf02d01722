"""Lowering: ONNX export, ONNX Runtime execution, the plan file and the runner that executes it."""
