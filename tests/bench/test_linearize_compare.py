"""linearize-compare's rows (the comparison's measurements are bench.prune_compare's, tested there)."""

from bench.linearize_compare import ROWS
from optimizer.targets import get_target


def test_the_first_row_is_the_shipped_targets_recipe():
    name, recipe = ROWS[0]
    assert "(ours, cpu-linearize)" in name and recipe == get_target("cpu-linearize").recipe
    assert len({name for name, _ in ROWS}) == len(ROWS)
