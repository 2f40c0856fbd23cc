"""The pull summary table: cells are shown as they are."""

from __future__ import annotations

import pytest

from puller import cli


def test_summary_cells_are_shown_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    """A cell is neither read as console markup ("[b]" would vanish as bold) nor coloured."""
    row = {"tenant": "t1", "scope": "customer", "status": "[b]failed[/b]", "pages": 12,
           "accepted": 600, "rejected": 0, "stale": 0, "duration_s": 0.25, "run_id": 7,
           "error": "HTTP 503 [retried 3 times]"}
    cli._print_pull_rows([row], as_json=False)
    out = capsys.readouterr().out
    assert "[b]failed[/b]" in out
    assert "\x1b[" not in out  # no colour off a terminal
    assert "run 7 (t1/customer): HTTP 503 [retried 3 times]" in out
    lines = [line for line in out.splitlines() if "t1" in line and "customer" in line]
    assert len(lines) == 2  # the table's row and the error below it
    assert all(cell in lines[0] for cell in ("12", "600", "0.25", "7"))
