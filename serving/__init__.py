"""Serving: an `optimize` output exported as a Triton Inference Server model repository (triton_repo), with
the Python-backend models it contains (triton_models/: copied into the repository, run by the server)."""
