"""Importing a library without the parts of its import that puller never uses (issue #5).

structlog takes rich's traceback printer when rich is installed, and httpx its command-line
tool (click, rich, pygments) when click is: 30-40 ms of imports each that puller never
uses, paid before a pull's first request. aiohttp loads the system's CA certificates twice
when imported (import_without_ca_store).
"""

from __future__ import annotations

import importlib
import os
import sys

_CA_STORE_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR")
_NO_SUCH_PATH = os.path.join(os.devnull, "none")  # below a file: no such file or folder


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


def import_without_ca_store(module: str) -> None:
    """Import `module` while OpenSSL finds no system CA certificates.

    aiohttp builds two default TLS contexts when it is imported, each loading the system's
    CA certificates (~25-45 ms each here, a third of aiohttp's import, before a pull's first
    request). puller never uses them: every connection gets puller's own context
    (client.build_http_client), built afterwards with the system's certificates or the
    tenant's ca_bundle. Built without certificates, those two would verify nothing, so
    anything that used them would fail closed, never open. OpenSSL looks for the system's
    certificates where SSL_CERT_FILE and SSL_CERT_DIR say; they name no file meanwhile and
    are set back as they were. Nothing is done if `module` is imported already."""
    if module in sys.modules:
        return
    saved = {name: os.environ.get(name) for name in _CA_STORE_ENV}
    os.environ.update(dict.fromkeys(_CA_STORE_ENV, _NO_SUCH_PATH))
    try:
        importlib.import_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
