"""Side-by-side comparisons with peers and naive baselines (experiments, not the product path)."""
