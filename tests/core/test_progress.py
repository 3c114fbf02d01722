"""Progress in a CI log: start and end lines with counts and durations when the log is not a terminal."""

from core import progress as progress_module
from core.progress import progress, timed


def test_loops_and_stages_log_start_and_end_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "interactive", lambda: False)
    lines: list[str] = []
    assert list(progress(range(3), desc="calibration", log=lines.append)) == [0, 1, 2]
    assert lines[0] == "calibration: 0/3" and lines[-1].startswith("calibration: 3/3 in ")
    lines.clear()
    with timed(lines.append, "lowering"):
        pass
    assert lines[0] == "lowering ..." and lines[1].startswith("lowering: done in ") and lines[1].endswith(" s")


def test_a_long_loop_logs_while_it_runs(monkeypatch):
    monkeypatch.setattr(progress_module, "interactive", lambda: False)
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    lines: list[str] = []
    list(progress(iter(range(4)), desc="recover", log=lines.append))
    assert lines[0] == "recover: 0" and len(lines) == 6  # start, one per item, end (no total: not a list)
