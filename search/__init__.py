"""Search over whole recipes: knobs of recipe fragments, cheap proxy trials (Optuna TPE, the gates as
constraints, measured speed as the objective), finalists verified at full budget, the Pareto front."""
