"""Start-up imports: what a pull imports before its first request (issue #5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from puller.imports import import_without, import_without_ca_store


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


def test_aiohttp_is_imported_without_the_ca_store_which_stays_for_puller(
    tmp_path: Path,
) -> None:
    """aiohttp's own default TLS contexts load no CA certificate (it is imported while
    SSL_CERT_FILE and SSL_CERT_DIR name no file); both are set back afterwards, so a
    context made after it (puller's, client.build_http_client) has the system's."""
    store = tmp_path / "ca.pem"
    store.write_text(_pem_of_a_ca())
    code = ("import os, ssl, puller.client, aiohttp.connector as c; "
            "print(len(c._SSL_CONTEXT_VERIFIED.get_ca_certs()), "
            "len(ssl.create_default_context().get_ca_certs()), "
            "os.environ['SSL_CERT_FILE'] == os.environ['EXPECTED'], "
            "'SSL_CERT_DIR' in os.environ)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSL_CERT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60,
                         env={**env, "SSL_CERT_FILE": str(store), "EXPECTED": str(store)})
    assert out.stdout.split() == ["0", "1", "True", "False"]


def test_import_without_ca_store_sets_the_variables_back_even_when_the_import_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "broken_tls_lib.py").write_text(
        "import os\nSEEN = os.environ['SSL_CERT_FILE']\nraise RuntimeError(SEEN)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/kept.pem")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(RuntimeError, match="none"):
        import_without_ca_store("broken_tls_lib")
    assert os.environ["SSL_CERT_FILE"] == "/etc/kept.pem"
    assert "SSL_CERT_DIR" not in os.environ


def _pem_of_a_ca() -> str:
    import trustme

    return trustme.CA().cert_pem.bytes().decode()
