"""The bottom layer: IR, family adapters, sampling loop, numerics, surgery, FLOPs, loading, errors, file I/O.

Imports nothing of ours from a package above it."""
