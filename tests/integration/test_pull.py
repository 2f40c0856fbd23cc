"""End-to-end pulls against the real loopback tenant server into real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from puller import applying, pipeline, prefetch, records, schema, shapes
from puller.config import TenantConfig
from puller.domain import Checkpoint, Scope
from puller.records import validate_page
from puller.store import Store
from puller.tenant_server import Fault, TenantServer, make_customer, timestamp
from tests.conftest import BACKENDS, add_dataset, captured_logs, config_for, nested_arrays
from tests.conftest import pull_runs as pull


def rows(store: Store, table: sa.Table, tenant: str) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        result = conn.execute(sa.select(table).where(table.c.tenant_id == tenant))
        return [dict(r._mapping) for r in result]


def run_rows(store: Store, tenant: str) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        result = conn.execute(sa.select(schema.runs).where(schema.runs.c.tenant_id == tenant)
                              .order_by(schema.runs.c.id))
        return [dict(r._mapping) for r in result]


def requests_to(server: TenantServer, tenant: str) -> list[tuple[str, dict[str, str]]]:
    return [(path, query) for path, query, _ in server.requests if path.startswith(f"/{tenant}/")]


@BACKENDS
async def test_page_mode_pulls_thousands_of_records_over_many_pages(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """2,500 customers over 25 pages land once each; the run row counts them; sweep reset."""
    add_dataset(tenant_server, tenant_id, customers=2500)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 100}})
    (result,) = await pull(config, store)
    assert result.status == "succeeded", result.error
    assert (result.stats.pages, result.stats.accepted, result.stats.stale) == (25, 2500, 0)
    stored = rows(store, schema.customers, tenant_id)
    assert len(stored) == 2500
    by_id = {r["customer_id"]: r for r in stored}
    source = tenant_server.datasets[tenant_id].records["customer"][1234]
    assert by_id["c1234"]["email"] == source["email"]
    assert by_id["c1234"]["first_name"] == source["first_name"]
    assert by_id["c1234"]["extra"] == {"loyalty_tier": source["loyalty_tier"]}
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER) == Checkpoint()
    (run,) = run_rows(store, tenant_id)
    assert (run["status"], run["pages"], run["accepted"]) == ("succeeded", 25, 2500)


@BACKENDS
async def test_cursor_mode_follows_cursors_to_the_end(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """Cursor pagination: first call without cursor, then meta.cursor until has_next_page false."""
    add_dataset(tenant_server, tenant_id, products=730)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"product": {"pagination": "cursor", "page_size": 100}})
    (result,) = await pull(config, store)
    assert result.status == "succeeded", result.error
    assert result.stats.pages == 8
    assert len(rows(store, schema.products, tenant_id)) == 730
    seen = requests_to(tenant_server, tenant_id)
    assert "cursor" not in seen[0][1] and all("cursor" in q for _, q in seen[1:])


async def test_scopes_run_in_import_order(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """customer and product are pulled before order starts (SPEC §4)."""
    add_dataset(tenant_server, tenant_id, customers=300, orders=300, products=300)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"order": {"page_size": 50}, "customer": {"page_size": 50},
                                "product": {"page_size": 50}})
    results = await pull(config, store)
    assert [r.status for r in results] == ["succeeded"] * 3
    paths = [path for path, _ in requests_to(tenant_server, tenant_id)]
    first_order = paths.index(f"/{tenant_id}/orders")
    assert f"/{tenant_id}/customers" not in paths[first_order:]
    assert f"/{tenant_id}/products" not in paths[first_order:]
    assert {f"/{tenant_id}/customers", f"/{tenant_id}/products"} <= set(paths[:first_order])


@BACKENDS
async def test_repull_changes_nothing_and_counts_stale(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """Re-pulling the same data applies nothing and counts every record stale."""
    add_dataset(tenant_server, tenant_id, customers=120)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 50}})
    await pull(config, store)
    before = rows(store, schema.customers, tenant_id)
    (again,) = await pull(config, store)
    assert (again.stats.accepted, again.stats.stale) == (0, 120)
    after = rows(store, schema.customers, tenant_id)
    assert sorted(map(str, after)) == sorted(map(str, before))


@BACKENDS
async def test_newer_version_replaces_wholly_and_older_is_stale(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """Newest wins with full replacement: no field merge; an older version is not applied."""
    data = add_dataset(tenant_server, tenant_id, customers=10)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 4}})
    await pull(config, store)
    people = data.records["customer"]
    people[1] = make_customer(1, email="neu@beispiel.de", loyalty_tier=None, vip=True,
                              last_modified_date=timestamp(10_000))
    people[2] = make_customer(2, email="old@example.com", last_modified_date=timestamp(-5))
    (result,) = await pull(config, store)
    assert (result.stats.accepted, result.stats.stale) == (1, 9)
    by_id = {r["customer_id"]: r for r in rows(store, schema.customers, tenant_id)}
    assert by_id["c1"]["email"] == "neu@beispiel.de"
    assert by_id["c1"]["extra"] == {"vip": True}, "full replacement, no merge of old extras"
    assert by_id["c2"]["email"] == "user2@example.com"


@BACKENDS
async def test_duplicates_within_a_page_keep_the_newest(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """A duplicated id in one page keeps its newest version; the other counts stale."""
    data = add_dataset(tenant_server, tenant_id, customers=3)
    data.records["customer"] = [
        make_customer(1, email="v2@example.com", last_modified_date=timestamp(20)),
        make_customer(1, email="v1@example.com", last_modified_date=timestamp(10)),
        make_customer(1, email="v3@example.com", last_modified_date=timestamp(30)),
    ]
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}})
    (result,) = await pull(config, store)
    assert (result.stats.accepted, result.stats.stale) == (1, 2)
    (row,) = rows(store, schema.customers, tenant_id)
    assert row["email"] == "v3@example.com"


@BACKENDS
async def test_soft_deleted_records_are_kept_with_deleted_at(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """deleted_at soft-deletes: the row stays (for reporting) with its deletion time."""
    data = add_dataset(tenant_server, tenant_id, products=3)
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"product": {}})
    await pull(config, store)
    data.records["product"][0].update(deleted_at="2025-01-02T03:04:05+02:00",
                                      last_modified_date=timestamp(500))
    await pull(config, store)
    by_id = {r["product_id"]: r for r in rows(store, schema.products, tenant_id)}
    assert len(by_id) == 3
    assert by_id["p0"]["deleted_at"].isoformat() == "2025-01-02T01:04:05+00:00"
    assert by_id["p1"]["deleted_at"] is None


@BACKENDS
async def test_rejected_records_are_stored_with_every_reason_and_the_rest_applies(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """Partial success: bad records go to rejected_records with run, page, position, reasons."""
    data = add_dataset(tenant_server, tenant_id, customers=6)
    data.records["customer"][4].update(consent="YES", email="nope")
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 3}})
    (result,) = await pull(config, store)
    assert result.status == "succeeded"
    assert (result.stats.accepted, result.stats.rejected) == (5, 1)
    (rejected,) = rows(store, schema.rejected_records, tenant_id)
    assert (rejected["scope"], rejected["run_id"], rejected["page"], rejected["position"]) == (
        "customer", result.run_id, "2", 1)
    assert rejected["record"] == data.records["customer"][4]
    assert [r.split(":")[0] for r in rejected["reasons"]] == ["email", "consent"]
    assert len(rows(store, schema.customers, tenant_id)) == 5


WIDE = 123456789012345678901234567891  # beyond 64 bits: orjson alone would read a float
NARROW_WIDE = -(2**63) - 1  # 19 digits, one below the smallest 64-bit integer


@BACKENDS
@pytest.mark.parametrize("page_size", [2, 50], ids=["pages-of-2", "one-page"])
async def test_integers_beyond_64_bits_are_stored_exactly(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str, page_size: int,
) -> None:
    """A number beyond 64 bits anywhere in a record is stored as sent, not rounded: a
    customer's extra field, an order's payload and id, a rejected record's raw copy. Pages of 2
    put some customers on a page of their own, with no such number."""
    data = add_dataset(tenant_server, tenant_id, customers=5, orders=2)
    data.records["customer"][1]["points"] = WIDE
    data.records["customer"][3]["debt"] = {"cents": [NARROW_WIDE, 1.5]}
    data.records["customer"][4].update(email="nope", points=-WIDE)
    data.records["order"][0]["ref"] = WIDE
    data.records["order"][1]["order_id"] = WIDE
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": page_size}, "order": {}})
    results = await pull(config, store)
    assert all(r.status == "succeeded" for r in results), [r.error for r in results]
    customers = {r["customer_id"]: r for r in rows(store, schema.customers, tenant_id)}
    assert customers["c1"]["extra"]["points"] == WIDE
    assert customers["c3"]["extra"]["debt"] == {"cents": [NARROW_WIDE, 1.5]}
    (rejected,) = rows(store, schema.rejected_records, tenant_id)
    assert rejected["record"] == data.records["customer"][4]
    orders = {r["order_id"]: r for r in rows(store, schema.orders, tenant_id)}
    assert orders["o0"]["payload"] == data.records["order"][0]
    assert orders[str(WIDE)]["payload"] == data.records["order"][1]
    assert store.list_rejects(tenant=tenant_id)[0]["record"]["points"] == -WIDE


@BACKENDS
async def test_a_record_nested_too_deep_is_rejected_not_the_run_failed(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str,
) -> None:
    """A record nested 300 levels deep (orjson reads it; it writes 254 at most) is rejected
    with that reason, its other fields kept in rejected_records; the run succeeds and the
    page's other records are stored."""
    data = add_dataset(tenant_server, tenant_id, customers=3, orders=3)
    data.records["customer"][1]["zz_deep"] = nested_arrays(299)
    data.records["order"][2]["zz_deep"] = {"x": nested_arrays(299)}
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {}, "order": {}})
    results = await pull(config, store)
    assert [(r.status, r.stats.accepted, r.stats.rejected) for r in results] == [
        ("succeeded", 2, 1), ("succeeded", 2, 1)], [r.error for r in results]
    kept = {r["scope"]: r for r in rows(store, schema.rejected_records, tenant_id)}
    assert kept["customer"]["reasons"] == [shapes.TOO_DEEP]
    assert kept["customer"]["record"] == {
        **data.records["customer"][1], "zz_deep": "(not kept: nested more than 200 levels deep)"}
    assert kept["order"]["record"]["order_id"] == "o2"
    assert len(rows(store, schema.customers, tenant_id)) == 2


@BACKENDS
async def test_a_record_with_a_nul_character_is_rejected_not_the_run_failed(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str,
) -> None:
    """A NUL character (\\u0000) in a customer's name or an order's note: PostgreSQL
    cannot store it, and the page failed at every sweep there. The record is rejected on
    either store, kept in rejected_records with U+FFFD in its place; the run succeeds."""
    data = add_dataset(tenant_server, tenant_id, customers=3, orders=2)
    data.records["customer"][1]["first_name"] = "a\x00b"
    data.records["order"][1]["note"] = "x\x00y"
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {}, "order": {}})
    results = await pull(config, store)
    assert [(r.status, r.stats.accepted, r.stats.rejected) for r in results] == [
        ("succeeded", 2, 1), ("succeeded", 1, 1)], [r.error for r in results]
    kept = {r["scope"]: r for r in rows(store, schema.rejected_records, tenant_id)}
    assert kept["customer"]["record"] == {**data.records["customer"][1], "first_name": "a\ufffdb"}
    assert kept["order"]["reasons"][0].startswith("note: holds a NUL character")


async def test_normalize_case_is_counted_on_the_run(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """With normalize_case, YES/male are stored canonical and counted on the run."""
    data = add_dataset(tenant_server, tenant_id, customers=4)
    data.records["customer"][0].update(consent="YES", gender="MALE")
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}},
                        normalize_case=True)
    (result,) = await pull(config, store)
    assert (result.stats.accepted, result.stats.normalised) == (4, 2)
    (run,) = run_rows(store, tenant_id)
    assert run["normalised"] == 2
    by_id = {r["customer_id"]: r for r in rows(store, schema.customers, tenant_id)}
    assert (by_id["c0"]["consent"], by_id["c0"]["gender"]) == ("Yes", "Male")


@BACKENDS
async def test_tenants_never_see_each_others_records(
    tenant_server: TenantServer, store: Store, store_url: str
) -> None:
    """Two tenants exporting the same ids keep separate rows under their own tenant id."""
    add_dataset(tenant_server, "iso-a", customers=5)
    data_b = add_dataset(tenant_server, "iso-b", customers=5)
    for person in data_b.records["customer"]:
        person["email"] = "b-" + person["email"]
    base = config_for(tenant_server, "iso-a", store=store_url, scopes={"customer": {}})
    other = config_for(tenant_server, "iso-b", store=store_url, scopes={"customer": {}})
    config = base.model_copy(update={"tenants": [*base.tenants, *other.tenants]})
    await pull(config, store)
    a = {r["customer_id"]: r["email"] for r in rows(store, schema.customers, "iso-a")}
    b = {r["customer_id"]: r["email"] for r in rows(store, schema.customers, "iso-b")}
    assert set(a) == set(b) and len(a) == 5
    assert all(not e.startswith("b-") for e in a.values())
    assert all(e.startswith("b-") for e in b.values())


@BACKENDS
async def test_failed_page_resumes_at_the_checkpoint(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """After retries a failing page fails the run; stored pages stay; the next run resumes there."""
    add_dataset(tenant_server, tenant_id, customers=50)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10}})
    passthrough = Fault()
    tenant_server.fail_next(tenant_id, "customers", passthrough, passthrough,
                            *[Fault(status=503)] * 3)
    (failed,) = await pull(config, store)
    assert failed.status == "failed"
    assert failed.error is not None and "page 3" in failed.error and "HTTP 503" in failed.error
    assert failed.stats.pages == 2
    assert len(rows(store, schema.customers, tenant_id)) == 20
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER) == Checkpoint(3, 3, None)

    tenant_server.requests.clear()
    (resumed,) = await pull(config, store)
    assert resumed.status == "succeeded"
    assert requests_to(tenant_server, tenant_id)[0][1]["page"] == "3"
    assert len(rows(store, schema.customers, tenant_id)) == 50
    runs = run_rows(store, tenant_id)
    assert sum(r["accepted"] for r in runs) == 50 and sum(r["stale"] for r in runs) == 0


async def test_cursor_checkpoint_resumes_with_the_stored_cursor(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """In cursor mode the checkpoint is the next cursor; the next run sends it."""
    add_dataset(tenant_server, tenant_id, orders=30)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"order": {"pagination": "cursor", "page_size": 10}})
    tenant_server.fail_next(tenant_id, "orders", Fault(), Fault(status=404))
    (failed,) = await pull(config, store)
    assert failed.status == "failed" and failed.stats.pages == 1
    checkpoint = store.load_checkpoint(tenant_id, Scope.ORDER)
    assert checkpoint.next_number == 2 and checkpoint.next_cursor is not None
    tenant_server.requests.clear()
    (resumed,) = await pull(config, store)
    assert resumed.status == "succeeded" and resumed.stats.pages == 2
    assert requests_to(tenant_server, tenant_id)[0][1]["cursor"] == checkpoint.next_cursor
    assert len(rows(store, schema.orders, tenant_id)) == 30


async def test_acknowledgements_are_sent_after_the_page_is_committed(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """commit_url gets one ack per stored page, and each page is already in the store then."""
    add_dataset(tenant_server, tenant_id, customers=25)
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {
        "page_size": 10, "commit_url": f"{tenant_server.url}/{tenant_id}/commit"}})
    observer = sa.create_engine(store_url)
    seen_in_store: list[int] = []

    def on_ack(ack: dict[str, Any]) -> None:
        if ack["tenant"] == tenant_id:
            with observer.connect() as conn:
                seen_in_store.append(conn.execute(
                    sa.select(sa.func.count()).select_from(schema.customers)
                    .where(schema.customers.c.tenant_id == tenant_id)).scalar_one())

    tenant_server.on_ack = on_ack
    try:
        (result,) = await pull(config, store)
    finally:
        tenant_server.on_ack = None
        observer.dispose()
    acks = [a for a in tenant_server.acks if a["tenant"] == tenant_id]
    assert [a["page"] for a in acks] == [1, 2, 3]
    assert seen_in_store == [10, 20, 25], "each ack came after its page was durable"
    assert acks[2] == {"tenant": tenant_id, "shop": f"{tenant_id}.example.com",
                       "scope": "customer", "page": 3, "cursor": None, "accepted": 5,
                       "rejected": 0, "run_id": result.run_id}


async def test_failed_acknowledgement_is_reported_and_never_rolls_back(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """An ack that keeps failing is counted and logged; the data stays; the run succeeds."""
    add_dataset(tenant_server, tenant_id, customers=5)
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {
        "commit_url": f"{tenant_server.url}/{tenant_id}/commit"}})
    tenant_server.fail_next(tenant_id, "commit", *[Fault(status=500)] * 3)
    with captured_logs() as events:
        (result,) = await pull(config, store)
    assert result.status == "succeeded" and result.stats.acks_failed == 1
    assert len(rows(store, schema.customers, tenant_id)) == 5
    (failed,) = [e for e in events if e["event"] == "ack_failed"]
    assert failed["tenant"] == tenant_id and "stays stored" in failed["error"]


@BACKENDS
@pytest.mark.parametrize("message", ["export paused for maintenance", "paused\x00now"],
                         ids=["plain", "with-a-nul"])
async def test_tenant_reported_error_fails_the_run_and_applies_nothing(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str, message: str,
) -> None:
    """status other than "success": the page is not applied; the message is reported and
    stored with the run (a NUL character in it as U+FFFD: PostgreSQL's text cannot hold
    one, and the run stayed open)."""
    add_dataset(tenant_server, tenant_id, customers=5)
    body = orjson.dumps({"status": "error", "message": message,
                         "meta": {"has_next_page": True}, "data": [make_customer(1)]})
    tenant_server.fail_next(tenant_id, "customers", Fault(body=body))
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}})
    (result,) = await pull(config, store)
    assert result.status == "failed"
    assert result.error is not None and message in result.error
    assert rows(store, schema.customers, tenant_id) == []
    (run,) = run_rows(store, tenant_id)
    assert run["status"] == "failed" and message.replace("\x00", "\ufffd") in run["error"]


async def test_page_ceiling_fails_the_run_without_applying_that_page(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """More pages than max_pages fails the run; pages before the ceiling stay stored."""
    add_dataset(tenant_server, tenant_id, customers=50)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10, "max_pages": 3}})
    (result,) = await pull(config, store)
    assert result.status == "failed" and result.error is not None
    assert "max_pages=3" in result.error and "page 3" in result.error
    assert len(rows(store, schema.customers, tenant_id)) == 20


async def test_loopback_is_refused_unless_private_networks_are_allowed(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """The SSRF guard refuses a host resolving to loopback; nothing is requested."""
    add_dataset(tenant_server, tenant_id, customers=5)
    allowed = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}})
    config = allowed.model_copy(update={"allow_private_networks": False})
    localhost = config.tenants[0].callbacks[Scope.CUSTOMER].model_copy(
        update={"url": tenant_server.url.replace("127.0.0.1", "localhost")
                + f"/{tenant_id}/customers"})
    tenant = config.tenants[0].model_copy(update={"callbacks": {Scope.CUSTOMER: localhost}})
    config = config.model_copy(update={"tenants": [tenant]})
    (result,) = await pull(config, store)
    assert result.status == "failed" and result.error is not None
    assert "resolves to 127.0.0.1" in result.error and "allow_private_networks" in result.error
    assert requests_to(tenant_server, tenant_id) == []


async def test_redirects_are_not_followed(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """A 302 fails the run with a message to register the final URL; the target is not called."""
    add_dataset(tenant_server, tenant_id, customers=5)
    tenant_server.fail_next(tenant_id, "customers", Fault(
        status=302, headers={"Location": f"{tenant_server.url}/{tenant_id}/products?k=1"}))
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}})
    (result,) = await pull(config, store)
    assert result.status == "failed" and result.error is not None
    assert "redirects are not followed" in result.error and "k=1" not in result.error
    assert len(requests_to(tenant_server, tenant_id)) == 1


async def test_secrets_stay_out_of_logs_and_errors(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """The API key authenticates, yet is in no log event or run error; 401 is not retried."""
    secret = "sk_live_Secret-42"
    data = add_dataset(tenant_server, tenant_id, customers=5)
    data.api_key = secret
    good = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}},
                      headers={"X-Api-Key": secret})
    with captured_logs() as events:
        (ok,) = await pull(good, store)
        data.api_key = "rotated"
        (refused,) = await pull(good, store)
    assert ok.status == "succeeded" and refused.status == "failed"
    assert refused.error is not None and "HTTP 401" in refused.error
    assert "credentials" in refused.error
    assert secret not in repr(events) and secret not in refused.error
    assert len([q for q in requests_to(tenant_server, tenant_id)]) == 2


async def test_log_events_carry_tenant_scope_run_and_page(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """page_applied events carry the fixed keys tenant, scope, run_id and page."""
    add_dataset(tenant_server, tenant_id, customers=15)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10}})
    with captured_logs() as events:
        (result,) = await pull(config, store)
    applied = [e for e in events if e["event"] == "page_applied"]
    assert [(e["tenant"], e["scope"], e["run_id"], e["page"]) for e in applied] == [
        (tenant_id, "customer", result.run_id, "1"), (tenant_id, "customer", result.run_id, "2")]
    assert {e["event"] for e in events} >= {"run_started", "run_succeeded"}


async def test_status_shows_checkpoint_and_last_run(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """status lists, per tenant and scope, the checkpoint and the last run."""
    add_dataset(tenant_server, tenant_id, customers=30)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10}, "product": {}})
    tenant_server.fail_next(tenant_id, "customers", Fault(), Fault(status=400))
    await pull(config, store, scopes=["customer"])
    customer, product = store.status([(tenant_id, Scope.CUSTOMER), (tenant_id, Scope.PRODUCT)])
    assert customer.checkpoint == Checkpoint(2, 2, None)
    assert customer.last_run is not None and customer.last_run["status"] == "failed"
    assert product.checkpoint is None and product.last_run is None


@pytest.mark.parametrize("module", [pipeline, applying, prefetch],
                         ids=["pipeline", "applying", "prefetch"])
def test_pipeline_module_needs_no_http_or_sql(module: ModuleType) -> None:
    """pipeline (and its page applying and its producer, prefetch) talk to ports only
    (STYLE.md); the import-linter contract enforces the rest."""
    assert module.__file__ is not None
    text = Path(module.__file__).read_text(encoding="utf-8")
    assert "import httpx" not in text and "sqlalchemy" not in text


@pytest.mark.parametrize(("prefetch", "lag"), [(None, 1), (1, 2), (3, 4)],
                         ids=["commit-url-default-0", "prefetch-1", "prefetch-3"])
async def test_prefetch_is_bounded_and_queue_style_tenants_stay_sequential(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str,
    prefetch: int | None, lag: int,
) -> None:
    """Page k is requested only after page k-lag was applied and acknowledged, where lag is
    prefetch + 1; with a commit_url prefetch defaults to 0 (strictly one page at a time)."""
    add_dataset(tenant_server, tenant_id, customers=80)
    callback: dict[str, Any] = {"page_size": 10,
                                "commit_url": f"{tenant_server.url}/{tenant_id}/commit"}
    if prefetch is not None:
        callback["prefetch"] = prefetch
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": callback})
    (result,) = await pull(config, store)
    assert result.status == "succeeded" and result.stats.pages == 8
    order = [("ack", int(payload["page"])) if path.endswith("/commit")
             else ("get", int(query["page"]))
             for path, query, payload in tenant_server.requests
             if path.startswith(f"/{tenant_id}/")]
    for index, (kind, page) in enumerate(order):
        if kind == "get" and page > lag:
            assert ("ack", page - lag) in order[:index], (page, order)
    if lag > 1:
        gets_before_first_ack = order.index(("ack", 1))
        assert gets_before_first_ack > 1, "pages were fetched ahead"


@pytest.mark.parametrize("pagination", ["page", "cursor"])
async def test_the_next_page_is_asked_for_while_this_one_is_validated(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str,
    monkeypatch: pytest.MonkeyPatch, pagination: str,
) -> None:
    """One request at a time, but the next page is asked for as soon as the tenant has said
    it exists, and its answer comes while this page is validated: validating a page and
    the tenant's work on the next overlap. Never a request beyond the last page."""
    add_dataset(tenant_server, tenant_id, customers=30)
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={
        "customer": {"page_size": 10, "pagination": pagination}})
    validate = records.validate_page
    seen: list[int] = []

    def slow_validate(scope: Scope, raws: Any, **kw: Any) -> Any:
        """Wait (up to 2 s) until the next page's request (of 3 pages) reaches the tenant."""
        deadline = time.monotonic() + 2
        while len(requests_to(tenant_server, tenant_id)) < min(len(seen) + 2, 3) \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(len(requests_to(tenant_server, tenant_id)))
        return validate(scope, raws, **kw)

    monkeypatch.setattr(records, "validate_page", slow_validate)
    (result,) = await pull(config, store)
    assert result.status == "succeeded" and result.stats.pages == 3
    assert seen == [2, 3, 3], "page k+1 was asked for while page k was validated"
    assert len(requests_to(tenant_server, tenant_id)) == 3


class _SecondPageNeverComes:
    """A page source whose first page says a second exists, which never comes."""

    async def fetch_page(self, request: Any) -> bytes:
        if request.page == 1:
            return orjson.dumps({"status": "success", "meta": {"has_next_page": True},
                                 "data": [make_customer(1)]})
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def acknowledge(self, ack: Any) -> None:
        raise AssertionError("pages are not acknowledged here")


class _NeverTaken:
    """An Ahead whose consumer never takes a page."""

    def __init__(self) -> None:
        self.got: list[Any] = []

    async def put(self, item: Any) -> None:
        self.got.append(item)
        await asyncio.Event().wait()


@pytest.mark.parametrize("when", ["handing-on", "asking"])
async def test_a_producer_ended_early_drops_the_page_it_asked_for_ahead(
    monkeypatch: pytest.MonkeyPatch, when: str,
) -> None:
    """A sweep that ends (stopped, failed, cancelled) while the next page was already
    asked for: that request is cancelled and its slot freed, however the producer was
    cancelled (handing page 1 on, or still sending page 2's request)."""
    config = TenantConfig.model_validate({
        "id": "acme", "shop": "acme.test",
        "callbacks": {"customer": {"url": "https://tenant.test/c"}}})
    job = pipeline.Job(tenant=config, scope=Scope.CUSTOMER)
    slots = asyncio.Semaphore(3)
    ahead = _NeverTaken()
    if when == "asking":  # cancelled in the turns of the loop that send the request
        monkeypatch.setattr(prefetch, "_SEND_YIELDS", 1000)
    producer = asyncio.create_task(prefetch.produce(
        job, prefetch.paginator_for(job.callback, Checkpoint()),
        source=_SecondPageNeverComes(), ahead=ahead, slots=slots))
    for _ in range(100):
        await asyncio.sleep(0)
    assert len(ahead.got) == (1 if when == "handing-on" else 0)
    producer.cancel()
    await asyncio.gather(producer, return_exceptions=True)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    for _ in range(2):  # page 1 holds its slot (until applied, and this sweep is over)
        await asyncio.wait_for(slots.acquire(), 1)
    assert slots.locked()


class _FivePages:
    """A page source of five pages of one customer each, answered at once."""

    async def fetch_page(self, request: Any) -> bytes:
        await asyncio.sleep(0)
        return orjson.dumps({"status": "success", "meta": {"has_next_page": request.page < 5},
                             "data": [make_customer(request.page)]})

    async def acknowledge(self, ack: Any) -> None:
        raise AssertionError("pages are not acknowledged here")


class _AppliedAtOnce:
    """An Ahead whose consumer takes each page at once and applies it (frees its slot)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self.slots = slots
        self.pages = 0

    async def put(self, item: Any) -> None:
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            self.pages += 1
            self.slots.release()


async def test_with_other_sweeps_fetching_a_page_is_validated_right_after_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several sweeps fetching in one event loop: between a page's parsing and its
    validation, no other sweep's page is parsed or validated (its records stay in the CPU's
    caches; prefetch._SEND_YIELDS). Alone, a sweep still asks for the next page before it
    validates this one (test_the_next_page_is_asked_for_while_this_one_is_validated)."""
    trace: list[tuple[str, str]] = []
    parse = prefetch.protocol.parse_envelope

    def traced_parse(body: bytes, *, where: Any) -> Any:
        trace.append(("parse", where.tenant))
        return parse(body, where=where)

    monkeypatch.setattr(prefetch.protocol, "parse_envelope", traced_parse)

    async def sweep(tenant: str) -> int:
        config = TenantConfig.model_validate({
            "id": tenant, "shop": f"{tenant}.test",
            "callbacks": {"customer": {"url": f"https://{tenant}.test/c"}}})
        job = pipeline.Job(tenant=config, scope=Scope.CUSTOMER)
        slots = asyncio.Semaphore(job.callback.effective_prefetch + 1)
        applied = _AppliedAtOnce(slots)

        def validate(raws: Any) -> Any:
            trace.append(("validate", tenant))
            return validate_page(Scope.CUSTOMER, raws)

        await prefetch.produce(job, prefetch.paginator_for(job.callback, Checkpoint()),
                               source=_FivePages(), ahead=applied, slots=slots,
                               validate=validate)
        return applied.pages

    assert await asyncio.gather(*(sweep(t) for t in ("ta", "tb", "tc"))) == [5, 5, 5]
    assert len(trace) == 30
    parsed = [i for i, (what, _) in enumerate(trace) if what == "parse"]
    assert [trace[i + 1] for i in parsed] == [("validate", trace[i][1]) for i in parsed]
    assert len({tenant for _, tenant in trace[:6]}) > 1, "the sweeps took turns"


class _BrokenSource:
    """A page source with a defect: it raises something that is no PullerError."""

    async def fetch_page(self, request: Any) -> bytes:
        raise RuntimeError("a bug in the source")

    async def acknowledge(self, ack: Any) -> None:
        raise AssertionError("no page was fetched, so none is acknowledged")


async def test_a_defect_fails_the_run_instead_of_hanging_it(store: Store) -> None:
    """An unexpected exception while fetching ends the run as failed, saying what happened
    and to report it; it never leaves the sweep waiting for a page forever."""
    config = TenantConfig.model_validate({
        "id": "acme", "shop": "acme.test",
        "callbacks": {"customer": {"url": "https://tenant.test/c"}}})
    job = pipeline.Job(tenant=config, scope=Scope.CUSTOMER)
    with captured_logs() as events:
        result = await asyncio.wait_for(pipeline.run_sweep(
            job, source=_BrokenSource(), sink=store, clock=pipeline.SystemClock()), 10)
    assert result.status == "failed"
    assert result.error is not None
    assert "internal error RuntimeError: a bug in the source" in result.error
    assert "report it" in result.error
    assert any(e["event"] == "run_crashed" for e in events)
    assert store.list_runs(tenant="acme")[0]["status"] == "failed"


class _Overlap:
    """A before_page hook that holds each request a moment and records the most at once."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, scope: str, query: dict[str, str]) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.hold_s)
        with self.lock:
            self.active -= 1


@BACKENDS
async def test_parallel_pages_asks_ahead_and_applies_in_order(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """parallel_pages: 4 keeps up to 4 page requests in flight against a slow tenant;
    pages are still applied in order, one transaction each, and nothing is asked twice
    into the store; the requests asked beyond the last page are dropped."""
    data = add_dataset(tenant_server, tenant_id, customers=95)
    overlap = _Overlap(hold_s=0.05)
    data.before_page = overlap
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 5, "parallel_pages": 4}})
    (result,) = await pull(config, store)
    assert result.status == "succeeded", result.error
    assert overlap.peak == 4
    assert result.stats.pages == 19  # 95 / 5, each applied once
    assert result.stats.accepted == len(validate_page(
        Scope.CUSTOMER, data.records["customer"]).accepted)
    assert store.count_records(tenant_id, Scope.CUSTOMER) == result.stats.accepted
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER) == Checkpoint()
    asked = [int(q["page"]) for path, q, _ in tenant_server.requests
             if path == f"/{tenant_id}/customers"]
    assert set(range(1, 20)) <= set(asked)
    assert len(asked) == len(set(asked)), "no page asked twice"
    assert max(asked) <= 19 + 3, "at most parallel_pages - 1 asked beyond the end"


@BACKENDS
async def test_a_pull_cancelled_while_a_run_is_being_started_records_it_interrupted(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM (the pull cancelled) while the store writes a run's row: the thread writes
    it anyway, so the run is recorded as interrupted and its lease freed before the
    cancellation goes on. It stayed `running` before, and the lease held."""
    add_dataset(tenant_server, tenant_id, customers=5)
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}})
    writing, go_on = threading.Event(), threading.Event()
    start_run = store.start_run

    def slow_start_run(*args: Any, **kwargs: Any) -> int:
        writing.set()
        go_on.wait(10)
        return start_run(*args, **kwargs)

    monkeypatch.setattr(store, "start_run", slow_start_run)
    pulling = asyncio.create_task(pull(config, store))
    assert await asyncio.to_thread(writing.wait, 10)
    pulling.cancel()
    await asyncio.sleep(0.05)  # the cancellation reaches the sweep while the row is written
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await pulling
    assert [r["status"] for r in run_rows(store, tenant_id)] == ["interrupted"]
    monkeypatch.undo()
    (result,) = await pull(config, store)  # the lease was freed
    assert result.status == "succeeded", result.error


async def test_a_cancelled_pull_ends_after_every_sweep_recorded_its_run(
    tenant_server: TenantServer,
) -> None:
    """Cancelled (SIGTERM), run_all raises only once every sweep has ended: one sweep that
    records its run quickly does not end the pull while another still records its own
    (asyncio.gather passed the first cancellation on at once, and the command's exit then
    cut the other short: its run stayed `running`)."""
    recorded: list[str] = []
    started = asyncio.Event()

    async def run_one(job: pipeline.Job) -> Any:
        try:
            started.set()
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if job.scope is Scope.PRODUCT:  # a slower store write
                await asyncio.shield(asyncio.sleep(0.2))
            recorded.append(job.scope.value)
            raise
        raise AssertionError("not cancelled")

    config = config_for(tenant_server, "t", store="sqlite://",
                        scopes={"customer": {}, "product": {}})
    tenant = config.tenants[0]
    jobs = [pipeline.Job(tenant=tenant, scope=scope) for scope in tenant.callbacks]
    pulling = asyncio.create_task(pipeline.run_all(jobs, run_one, max_concurrent=4))
    await started.wait()
    await asyncio.sleep(0.01)
    pulling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pulling
    assert sorted(recorded) == ["customer", "product"]


@BACKENDS
async def test_a_tenant_that_hangs_holds_only_its_own_slot(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """Issue #5: no tenant waits for another to finish. Two slots, four tenants: the first
    tenant's server hangs on its first page, holding one slot; the other three are pulled
    whole, one after another, through the other slot meanwhile."""
    hang, *others = [f"{tenant_id}{name}" for name in ("hang", "a", "b", "c")]
    add_dataset(tenant_server, hang, customers=5)
    for tenant in others:
        add_dataset(tenant_server, tenant, customers=30)
    tenant_server.fail_next(hang, "customers", Fault(delay_s=2.5))
    each = [config_for(tenant_server, tenant, store=store_url,
                       scopes={"customer": {"page_size": 10}}) for tenant in (hang, *others)]
    config = each[0].model_copy(update={"tenants": [c.tenants[0] for c in each]})
    results = await pull(config, store, concurrency=2)
    assert [(r.tenant, r.status) for r in results] == [
        (tenant, "succeeded") for tenant in (hang, *others)]
    finished = {tenant: run_rows(store, tenant)[0]["finished_at"] for tenant in (hang, *others)}
    assert all(len(rows(store, schema.customers, tenant)) == 30 for tenant in others)
    # The three finished while the first still waited for its page (2.5 s).
    assert all((finished[hang] - finished[tenant]).total_seconds() > 1.5 for tenant in others)
