"""Tenant fault matrix on the real loopback server, each with its expected outcome."""

from __future__ import annotations

import json
from typing import Any

from puller import schema
from puller.domain import Scope
from puller.records import validate_page
from puller.store import Store
from puller.tenant_server import Fault, TenantServer, timestamp
from tests.conftest import add_dataset, captured_logs, config_for
from tests.conftest import pull_one as pull


def stored_versions(store: Store, tenant: str) -> dict[str, str]:
    with store.engine.connect() as conn:
        rows = conn.execute(schema.customers.select().where(
            schema.customers.c.tenant_id == tenant)).all()
    return {r.customer_id: r.last_modified_date.strftime("%Y-%m-%dT%H:%M:%SZ") for r in rows}


async def test_an_export_that_never_ends_fails_at_the_ceiling_every_time(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """has_next_page always true: the run fails at max_pages, and so does the next one."""
    data = add_dataset(tenant_server, tenant_id, customers=30)
    data.endless = True
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10, "max_pages": 6}})
    first = await pull(config, store)
    second = await pull(config, store)
    for result in (first, second):
        assert result.status == "failed" and result.error is not None
        assert "max_pages=6" in result.error and "page 6" in result.error
    assert store.count_records(tenant_id, Scope.CUSTOMER) == 30
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER).next_number == 6


async def test_a_page_size_changing_mid_sweep_is_a_warning_and_nothing_served_is_lost(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """A tenant answering another page_size than asked: a warning; every record it served
    is stored."""
    data = add_dataset(tenant_server, tenant_id, customers=25)
    people = data.records["customer"]
    body = (b'{"meta": {"has_next_page": true, "page": 2, "page_size": 7}, "data": '
            + json.dumps(people[10:17]).encode() + b"}")
    tenant_server.fail_next(tenant_id, "customers", Fault(), Fault(body=body))
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10}})
    with captured_logs() as events:
        result = await pull(config, store)
    assert result.status == "succeeded"
    (warning,) = [e for e in events if e["event"] == "page_meta_mismatch"]
    assert warning["detail"] == "meta.page_size=7 but 10 was asked" and warning["page"] == "2"
    assert store.count_records(tenant_id, Scope.CUSTOMER) == 25 - 3  # 17..19 never served


async def test_records_moving_between_pages_mid_sweep_converge_next_sweep(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """A tenant sorting by last_modified_date moves an updated record to the end while
    being paged; offset paging may miss a record that sweep; the next sweep converges."""
    data = add_dataset(tenant_server, tenant_id, customers=40)
    people = data.records["customer"]
    moved: dict[str, Any] = {}

    def update_while_paging(scope: str, query: dict[str, str]) -> None:
        if query.get("page") == "3" and not moved:
            record = people.pop(5)  # already served on page 1; the rest shift up by one
            record["last_modified_date"] = timestamp(50_000)
            people.append(record)
            moved.update(record)

    data.before_page = update_while_paging
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10, "prefetch": 0}})
    assert (await pull(config, store)).status == "succeeded"
    missed = {p["customer_id"] for p in people} - set(stored_versions(store, tenant_id))
    assert missed <= {people[19]["customer_id"]}, "at most the record shifted across a page"
    data.before_page = None
    assert (await pull(config, store)).status == "succeeded"
    expected = {a.record_id: a.last_modified_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                for a in validate_page(Scope.CUSTOMER, people).accepted}
    assert stored_versions(store, tenant_id) == expected
    assert expected[moved["customer_id"]] == timestamp(50_000)


async def test_a_read_timeout_is_retried_then_succeeds(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """A server that stalls past the timeout once is retried; the page then applies."""
    add_dataset(tenant_server, tenant_id, customers=12)
    tenant_server.fail_next(tenant_id, "customers", Fault(), Fault(delay_s=1.5))
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 5, "timeout": "0.5s"}})
    result = await pull(config, store)
    assert result.status == "succeeded" and store.count_records(tenant_id, Scope.CUSTOMER) == 12


async def test_a_503_burst_with_retry_after_is_ridden_out(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """503 twice with Retry-After: 0, then success: no page lost, none doubled."""
    add_dataset(tenant_server, tenant_id, customers=12)
    tenant_server.fail_next(tenant_id, "customers", Fault(),
                            *[Fault(status=503, headers={"Retry-After": "0"})] * 2)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 5}})
    result = await pull(config, store)
    assert result.status == "succeeded" and result.stats.accepted == 12


def test_a_client_hanging_up_is_no_server_error(tenant_server: TenantServer,
                                                capfd: Any) -> None:
    """The bundled tenant prints no traceback for a client that hung up before its answer
    was written (a pull killed mid-request); any other error of its own it still prints."""
    server = tenant_server.httpd
    for hang_up in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
        try:
            raise hang_up
        except ConnectionError:
            server.handle_error(None, ("127.0.0.1", 1))
    assert "Traceback" not in capfd.readouterr().err
    try:
        raise ValueError("a defect of the server's")
    except ValueError:
        server.handle_error(None, ("127.0.0.1", 1))
    assert "a defect of the server's" in capfd.readouterr().err
