"""The tables of `pull`, `status`, `runs` and `rejects`: cells shown as they are, rich's
table on a terminal, plain text off one."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from puller import cli

ROW = {"tenant": "t1", "scope": "customer", "status": "[b]failed[/b]", "pages": 12,
       "accepted": 600, "rejected": 0, "stale": 0, "duration_s": 0.25, "run_id": 7,
       "error": "HTTP 503 [retried 3 times]"}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_summary_cells_are_shown_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    """A cell is neither read as console markup ("[b]" would vanish as bold) nor coloured."""
    cli._print_pull_rows([ROW], as_json=False)
    out = capsys.readouterr().out
    assert "[b]failed[/b]" in out
    assert "\x1b[" not in out  # no colour off a terminal
    assert "run 7 (t1/customer): HTTP 503 [retried 3 times]" in out
    lines = [line for line in out.splitlines() if "t1" in line and "customer" in line]
    assert len(lines) == 2  # the table's row and the error below it
    assert all(cell in lines[0] for cell in ("12", "600", "0.25", "7"))


def test_off_a_terminal_the_table_is_plain_text_a_row_a_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Off a terminal (a pipe, cron's mail, a log file): the title, the header, a rule and a
    row a line, never wrapped however wide, texts aligned left and numbers right, a line
    break in a cell written as \\n so that the row stays one line; rich is not imported."""
    wide = {**ROW, "tenant": "t" * 150, "status": "failed\nagain", "pages": 3}
    cli._print_pull_rows([ROW, wide], as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "puller pull"
    assert lines[1].split() == ["tenant", "scope", "status", "pages", "accepted", "rejected",
                                "stale", "duration_s", "run_id"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    assert lines[3].startswith("t1 ") and lines[4].startswith("t" * 150 + "  customer")
    assert "failed\\nagain" in lines[4]
    pages = lines[1].index("pages") + len("pages")  # right-aligned under its header
    assert lines[3][pages - 2:pages] == "12" and lines[4][pages - 1] == "3"
    status = lines[1].index("status")  # left-aligned under its header
    assert lines[3][status:].startswith("[b]failed[/b]")
    code = ("import sys; from puller import cli; cli._print_pull_rows([], as_json=False); "
            "assert 'rich' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "puller pull"


def test_on_a_terminal_rich_draws_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal (here one 200 columns wide) rich draws the table (its box), the cells
    still as they are."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setenv("COLUMNS", "200")
    cli._print_pull_rows([ROW], as_json=False)
    out = terminal.getvalue()
    assert "┃" in out or "│" in out
    assert "[b]failed[/b]" in out
