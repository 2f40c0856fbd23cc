"""Importing a library as if an optional package it looks for were not installed (issue #5).

structlog takes rich's traceback printer when rich is installed, and httpx its command-line
tool (click, rich, pygments) when click is: 30-40 ms of imports each that puller never
uses, paid before a pull's first request.
"""

from __future__ import annotations

import importlib
import sys


def import_without(module: str, *, absent: str) -> None:
    """Import `module` while `import absent` raises ImportError, so that `module` takes its
    own path for a missing `absent`. Nothing is done if either is imported already: `absent`
    is then in use, and stays importable afterwards in any case."""
    if module in sys.modules or absent in sys.modules:
        return
    sys.modules[absent] = None  # type: ignore[assignment]  # the import system's "not here"
    try:
        importlib.import_module(module)
    finally:
        del sys.modules[absent]
