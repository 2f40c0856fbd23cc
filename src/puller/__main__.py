"""`python -m puller` runs the CLI."""

from __future__ import annotations

from puller import cli

cli.main()
