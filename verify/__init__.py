"""Fidelity: paired and distribution metrics, gates, latency measurement."""
