"""Start-up imports: what a pull imports before its first request (issue #5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from puller.imports import import_without


def test_a_pull_imports_no_rich_and_no_cli_tool_before_it_prints() -> None:
    """structlog and httpx are imported without the optional packages they would take
    (rich's traceback printer; httpx's command-line tool with click): what a pull imports
    to start stays lean. rich is imported where a table or progress bar is drawn."""
    code = ("import sys, puller.cli, puller.client, puller.store; "
            "print(sorted(m for m in ('rich', 'click', 'pygments') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_import_without_hides_the_package_only_while_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The module imported takes its path for a missing package; the package stays
    importable afterwards; nothing is done once the package is in use."""
    (tmp_path / "optional_dep.py").write_text("VALUE = 1\n")
    (tmp_path / "lib_using_it.py").write_text(
        "try:\n    import optional_dep\nexcept ImportError:\n    optional_dep = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("optional_dep", "lib_using_it"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import_without("lib_using_it", absent="optional_dep")
    assert sys.modules["lib_using_it"].optional_dep is None
    assert "optional_dep" not in sys.modules
    import optional_dep  # importable again

    assert optional_dep.VALUE == 1
    del sys.modules["lib_using_it"]
    import_without("lib_using_it", absent="optional_dep")  # in use now: left alone
    assert "lib_using_it" not in sys.modules
