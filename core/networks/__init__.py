"""Denoiser networks of families whose own library cannot be imported here (see each module)."""
