"""Calibration data: denoiser inputs/outputs captured along the reference program's trajectories."""
