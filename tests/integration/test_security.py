"""TLS verification and pinning, tenant isolation against hostile payloads, bound SQL."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trustme

from puller import client, errors, schema
from puller.config import PullerConfig, TenantConfig
from puller.domain import Scope
from puller.store import Store
from puller.tenant_server import Dataset, TenantServer, make_customer, make_order
from tests.conftest import BACKENDS, add_dataset, config_for, pull_runs
from tests.conftest import pull_one as _pull


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(ca: trustme.CA) -> Iterator[TenantServer]:
    """A tenant server on https://localhost with a certificate from a private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    server = TenantServer(tls=context).start()
    server.add("tls", Dataset.generate("tls.example.com", customers=15))
    yield server
    server.stop()


def _tls_config(server: TenantServer, store_url: str, **tenant: Any) -> PullerConfig:
    url = server.url.replace("127.0.0.1", "localhost") + "/tls/customers"
    return PullerConfig.model_validate({
        "store": store_url, "allow_private_networks": True,
        "retry": {"attempts": 3, "initial_wait": 0.01, "max_wait": 0.02},
        "tenants": [{"id": "tls", "shop": "tls.example.com", **tenant,
                     "callbacks": {"customer": {"url": url, "page_size": 10}}}],
    })


async def test_tls_is_verified_by_default(tls_server: TenantServer, store: Store,
                                          store_url: str) -> None:
    """An untrusted certificate fails the run at once with what to do; nothing is stored."""
    result = await _pull(_tls_config(tls_server, store_url), store)
    assert result.status == "failed" and result.error is not None
    assert "TLS certificate of localhost is not trusted" in result.error
    assert "ca_bundle" in result.error and "never switched off" in result.error
    assert store.count_records("tls", Scope.CUSTOMER) == 0


async def test_a_tenant_may_pin_its_ca_bundle(tls_server: TenantServer, ca: trustme.CA,
                                              store: Store, store_url: str,
                                              tmp_path: Path) -> None:
    """With ca_bundle pointing at the tenant's CA, the same server is trusted."""
    bundle = tmp_path / "tenant-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    result = await _pull(_tls_config(tls_server, store_url, ca_bundle=str(bundle)), store)
    assert result.status == "succeeded", result.error
    assert store.count_records("tls", Scope.CUSTOMER) == 15


@pytest.mark.parametrize("fetch_process", [False, True], ids=["one-process", "fetch-process"])
def test_a_tenant_trusted_by_the_system_ca_store_is_trusted(
    tls_server: TenantServer, ca: trustme.CA, tmp_path: Path, fetch_process: bool,
) -> None:
    """aiohttp is imported without the system's CA certificates (imports.py); puller's own
    TLS context still has them: with the private CA as the system's store (SSL_CERT_FILE),
    `puller pull` trusts the server without a ca_bundle, and says what it trusts."""
    system_store = tmp_path / "system-ca.pem"
    ca.cert_pem.write_to_path(str(system_store))
    url = tls_server.url.replace("127.0.0.1", "localhost") + "/tls/customers"
    config = tmp_path / "puller.yaml"
    config.write_text(
        f"store: sqlite:///{tmp_path}/tls.db\nallow_private_networks: true\ntenants:\n"
        f"  - id: tls\n    shop: tls.example.com\n    callbacks:\n"
        f"      customer: {{url: '{url}', page_size: 10}}\n")
    config.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULLER_", "SSL_CERT"))}
    done = subprocess.run(
        [sys.executable, "-m", "puller", "pull", "--config", str(config), "--json",
         *(["--fetch-process"] if fetch_process else [])],
        env={**env, "SSL_CERT_FILE": str(system_store)}, capture_output=True, text=True,
        timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert [(r["status"], r["accepted"]) for r in json.loads(done.stdout)] == [("succeeded", 15)]


def test_only_a_tenant_with_an_https_url_loads_ca_certificates(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tenant whose every URL is http:// gets a client whose TLS context trusts nothing
    (no CA certificates loaded: 16-40 ms of start-up saved) and still verifies; one with an
    https:// URL, callback or commit_url, gets the system's certificates."""
    system_store = tmp_path / "system-ca.pem"
    ca.cert_pem.write_to_path(str(system_store))
    monkeypatch.setenv("SSL_CERT_FILE", str(system_store))

    def tenant(tid: str, url: str, commit_url: str | None = None) -> TenantConfig:
        return PullerConfig.model_validate({"tenants": [{
            "id": tid, "shop": f"{tid}.example.com",
            "callbacks": {"customer": {"url": url, "commit_url": commit_url}}}]}).tenants[0]

    clients = client.HttpClients(allow_private_networks=True)
    plain = clients.for_tenant(tenant("a", "http://a.example.com/customers")).transport.tls
    secure = clients.for_tenant(tenant("b", "https://b.example.com/customers")).transport.tls
    acked = clients.for_tenant(tenant("c", "http://c.example.com/customers",
                                      "https://c.example.com/ack")).transport.tls
    assert plain.get_ca_certs() == [] and plain.verify_mode == ssl.CERT_REQUIRED
    assert plain.check_hostname
    assert len(secure.get_ca_certs()) == 1 and acked is secure


async def test_an_unreadable_ca_bundle_is_a_config_error(tls_server: TenantServer,
                                                         store: Store, store_url: str) -> None:
    """A missing CA file is a config error naming the tenant's key, before any request."""
    config = _tls_config(tls_server, store_url, ca_bundle="/nonexistent/ca.pem")
    with pytest.raises(errors.ConfigError, match=r"tenants\[tls\]\.ca_bundle"):
        await _pull(config, store)


@BACKENDS
async def test_a_payload_cannot_write_under_another_tenant(
    tenant_server: TenantServer, store: Store, store_url: str
) -> None:
    """Records claiming another tenant_id (or run_id) land under the configured tenant only."""
    add_dataset(tenant_server, "victim", customers=3, orders=3)
    victim = config_for(tenant_server, "victim", store=store_url,
                        scopes={"customer": {}, "order": {}})
    await _pull_all(victim, store)
    before = _rows(store, "victim")
    hostile = add_dataset(tenant_server, "mallory", customers=0, orders=0)
    hostile.records["customer"] = [make_customer(
        1, tenant_id="victim", run_id=999, stored_at="1970-01-01", email="mallory@evil.test",
        last_modified_date="2099-01-01T00:00:00Z")]
    hostile.records["order"] = [make_order(1, tenant_id="victim",
                                           last_modified_date="2099-01-01T00:00:00Z")]
    config = config_for(tenant_server, "mallory", store=store_url,
                        scopes={"customer": {}, "order": {}})
    await _pull_all(config, store)
    assert _rows(store, "victim") == before
    mallory = _rows(store, "mallory")
    assert mallory["customers"][0]["extra"]["tenant_id"] == "victim"  # kept as data, only
    assert mallory["customers"][0]["run_id"] != 999


@BACKENDS
async def test_sql_metacharacters_are_stored_verbatim(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """Values reach SQL only as bound parameters: quotes and statements are plain text."""
    nasty = "Robert'); DROP TABLE customers; --"
    data = add_dataset(tenant_server, tenant_id, customers=1)
    data.records["customer"][0].update(first_name=nasty[:100], last_name='"; DELETE FROM runs',
                                       **{"note'": "x\\' OR 1=1", "$.path": "json path"})
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}})
    await _pull_all(config, store)
    (row,) = _rows(store, tenant_id)["customers"]
    assert row["first_name"] == nasty and row["last_name"] == '"; DELETE FROM runs'
    assert row["extra"]["note'"] == "x\\' OR 1=1" and row["extra"]["$.path"] == "json path"
    assert store.list_runs(tenant=tenant_id)


async def _pull_all(config: PullerConfig, store: Store) -> None:
    results = await pull_runs(config, store, concurrency=1)
    assert all(r.status == "succeeded" for r in results), [r.error for r in results]


def _rows(store: Store, tenant: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    with store.engine.connect() as conn:
        for name, table in (("customers", schema.customers), ("orders", schema.orders)):
            result = conn.execute(sa.select(table).where(table.c.tenant_id == tenant))
            out[name] = [{k: v for k, v in r._mapping.items() if k != "stored_at"}
                         for r in result]
    return out
