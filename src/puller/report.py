"""The CLI's output: tables (rich's on a terminal, plain text off one) or JSON."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from puller.protocol import json_text


def rows(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], *,
         as_json: bool) -> None:
    """JSON (`--json`) or a table."""
    if as_json:
        sys.stdout.write(json_text(list(rows), indent=True) + "\n")
    else:
        table(title, rows, columns)


_LEFT = ("tenant", "tenant_id", "scope")
"""The columns rich's table aligns left, every other right (the plain table aligns the
columns of numbers right, every other left)."""


def table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """rich's table on a terminal; off one (a pipe, cron's mail, a log file), plain text."""
    if not sys.stdout.isatty():
        _plain_table(title, rows, columns)
        return
    # rich is imported where it draws, not before a pull starts (~25 ms; logs.py keeps
    # structlog from importing it too).
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in _LEFT else "right")
    # Cells as Text: shown as they are, neither read as console markup nor highlighted. A
    # summary of 100 runs took 123 -> 64 ms to draw (the last step of a pull of 100
    # tenants, best of 5).
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in columns))
    Console().print(table)


def _plain_table(title: str, rows: Sequence[dict[str, Any]],
                 columns: Sequence[str]) -> None:
    """The table as plain text: a row a line, never wrapped, columns two spaces apart,
    numbers aligned right, a line break in a cell written as \\n. Off a terminal no one
    sees rich's box and colours, and its import and drawing were the last ~70 ms of every
    pull here (~135 ms for a summary of 100 runs), after the last page."""
    cells = [[_cell(row.get(column)).replace("\r", "\\r").replace("\n", "\\n")
              for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)])
              for i, column in enumerate(columns)]
    right = [all(_is_number(row.get(column)) for row in rows) for column in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.rjust(width) if numeric else value.ljust(width)
                         for value, width, numeric in zip(values, widths, right,
                                                          strict=True)).rstrip()

    sys.stdout.write("\n".join([title, line(columns), line(["-" * w for w in widths]),
                                 *map(line, cells)]) + "\n")


def _is_number(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)
