"""A bundled example tenant for the demo and tests, with fault switches.

It writes the callback wire format itself (stdlib json, never puller.protocol), so a bug
shared by puller's parser and this server cannot hide. Routes, per tenant::

    POST /{tenant}/{customers|orders|products}?page=N&page_size=M   page mode
    POST /{tenant}/{customers|orders|products}?page_size=M[&cursor=C] cursor mode
    POST /{tenant}/commit                                           delivery acks

Run ``python -m puller.tenant_server --help`` for a standalone server.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

SCOPE_PATHS = {"customers": "customer", "orders": "order", "products": "product"}
BASE_TIME = datetime(2024, 12, 1, tzinfo=UTC)
FIRST_NAMES = ("Zoë", "Jürgen", "Siobhán", "Łukasz", "Amélie", "Håkon", "Nuño", "Chloé")
LAST_NAMES = ("Ørsted", "Müller", "Ó Briain", "Wałęsa", "Dvořák", "García", "Smith")


def timestamp(minutes: int) -> str:
    """An ISO 8601 UTC timestamp `minutes` after the dataset's base time."""
    return (BASE_TIME + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_customer(i: int, **over: Any) -> dict[str, Any]:
    """A valid customer; keyword overrides replace fields (None removes one)."""
    record: dict[str, Any] = {
        "customer_id": f"c{i}",
        "email": f"user{i}@example.com",
        "first_name": FIRST_NAMES[i % len(FIRST_NAMES)],
        "last_name": LAST_NAMES[i % len(LAST_NAMES)],
        "mobile": f"+4479{i:08d}"[:20],
        "language": ("en", "de", "fr-CA", "pl")[i % 4],
        "consent": ("Yes", "No")[i % 2],
        "gender": ("Male", "Female")[i % 2],
        "last_modified_date": timestamp(i),
        "loyalty_tier": ("gold", "silver")[i % 2],
    }
    return _override(record, over)


def make_order(i: int, **over: Any) -> dict[str, Any]:
    """A valid order with money fields in the smallest unit."""
    record: dict[str, Any] = {
        "order_id": f"o{i}",
        "customer_id": f"c{i % 97}",
        "last_modified_date": timestamp(i),
        "total": {"amount": 1999 + i, "precision": 2, "currency": "EUR"},
        "lines": [{"product_id": f"p{i % 13}", "quantity": 1 + i % 3,
                   "price": {"amount": 999, "precision": 2, "currency": "EUR"}}],
    }
    return _override(record, over)


def make_product(i: int, **over: Any) -> dict[str, Any]:
    """A valid product."""
    record: dict[str, Any] = {
        "product_id": f"p{i}",
        "last_modified_date": timestamp(i),
        "title": f"Produkt Nr. {i} — Grüße",
        "price": {"amount": 500 + i, "precision": 2, "currency": "USD"},
    }
    return _override(record, over)


def _override(record: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    return record


_INVALID = (
    {"consent": "YES"},                    # the public guide's own example; strict rejects
    {"email": "not-an-email"},
    {"gender": "male"},
    {"last_modified_date": "yesterday"},
)


@dataclass
class Dataset:
    """One tenant's exported records per scope, in export order; tests may mutate it."""

    shop: str
    records: dict[str, list[Any]] = field(default_factory=dict)
    api_key: str | None = None
    page_delay_s: float = 0.0
    """Sleep before each page: a slow tenant, so tests can act while a sweep is under way."""
    ack_delay_s: float = 0.0
    """Sleep before answering an acknowledgement (kills can land during the ack)."""
    endless: bool = False
    """Always answer has_next_page: true (an export that never ends)."""
    before_page: Callable[[str, dict[str, str]], None] | None = None
    """Called with (scope, query) before a page is rendered: tests change data mid-sweep."""

    @classmethod
    def generate(
        cls, shop: str, *, customers: int = 0, orders: int = 0, products: int = 0,
        invalid_every: int = 0, api_key: str | None = None,
    ) -> Dataset:
        """Deterministic data; every `invalid_every`-th customer/order breaks a rule."""
        people = [make_customer(i) for i in range(customers)]
        sales = [make_order(i) for i in range(orders)]
        if invalid_every:
            for n, i in enumerate(range(invalid_every - 1, customers, invalid_every)):
                people[i].update(_INVALID[n % len(_INVALID)])
            for i in range(invalid_every - 1, orders, invalid_every):
                sales[i]["total"] = {"amount": 199.99, "precision": 2, "currency": "EUR"}
        return cls(shop=shop, api_key=api_key, records={
            "customer": people, "order": sales,
            "product": [make_product(i) for i in range(products)],
        })


@dataclass
class Fault:
    """One scripted misbehaviour, used once for the next matching request."""

    status: int = 200
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    reset: bool = False


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up before its answer is written (a pull killed or ended while
    a request was in flight) is no error of the server's: no traceback for it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipe, ConnectionReset
            return
        super().handle_error(request, client_address)


class TenantServer:
    """The HTTP server, its datasets, its fault queue and what it was sent."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.datasets: dict[str, Dataset] = {}
        self.faults: dict[str, deque[Fault]] = {}
        self.acks: list[dict[str, Any]] = []
        self.on_ack: Callable[[dict[str, Any]], None] | None = None
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.httpd = _QuietServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            self._scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{self._scheme}://{host!s}:{port}"

    def add(self, tenant: str, dataset: Dataset) -> Dataset:
        self.datasets[tenant] = dataset
        return dataset

    def fail_next(self, tenant: str, scope_path: str, *faults: Fault) -> None:
        """Queue faults for the next requests to /{tenant}/{scope_path}."""
        with self.lock:
            self.faults.setdefault(f"/{tenant}/{scope_path}", deque()).extend(faults)

    def start(self) -> TenantServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def page(self, tenant: str, scope: str, query: dict[str, str]) -> dict[str, Any]:
        """The envelope for one request, in page or cursor mode."""
        dataset = self.datasets[tenant]
        if dataset.page_delay_s:
            time.sleep(dataset.page_delay_s)
        if dataset.before_page is not None:
            dataset.before_page(scope, query)
        rows = dataset.records[scope]
        size = int(query.get("page_size", "50"))
        if "page" in query:
            page = int(query["page"])
            start = (page - 1) * size
            chunk = rows[start:start + size]
            meta: dict[str, Any] = {"has_next_page": dataset.endless or start + size < len(rows),
                                    "page": page, "page_size": size}
        else:
            start = cursor_offset(query.get("cursor"))
            chunk = rows[start:start + size]
            more = start + size < len(rows)
            meta = {"has_next_page": more, "page_size": size,
                    "cursor": cursor_for(start + size) if more else None}
        return {"status": "success", "message": "", "meta": meta, "data": chunk}


def cursor_for(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def cursor_offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    return int(base64.urlsafe_b64decode(cursor.encode()).decode().split(":")[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes; with Nagle on, delayed ACKs add ~40 ms a page.
    disable_nagle_algorithm = True
    tenants: TenantServer  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        payload = json.loads(body or b"{}")
        server = self.tenants
        with server.lock:
            server.requests.append((parts.path, query, payload))
            queue = server.faults.get(parts.path)
            fault = queue.popleft() if queue else None
        if fault is not None and self._fault(fault):
            return
        self._route(parts.path, query, payload)

    def _route(self, path: str, query: dict[str, str], payload: dict[str, Any]) -> None:
        server = self.tenants
        segments = path.strip("/").split("/")
        if len(segments) != 2 or segments[0] not in server.datasets:
            return self._send(404, {"status": "error", "message": "unknown tenant"})
        tenant, what = segments
        refusal = self._refusal(server.datasets[tenant], payload)
        if refusal is not None:
            return self._send(refusal[0], {"status": "error", "message": refusal[1]})
        if what == "commit":
            if server.datasets[tenant].ack_delay_s:
                time.sleep(server.datasets[tenant].ack_delay_s)
            ack = {"tenant": tenant, **payload}
            if server.on_ack is not None:
                server.on_ack(ack)
            with server.lock:
                server.acks.append(ack)
            return self._send(200, {"status": "success"})
        if what not in SCOPE_PATHS:
            return self._send(404, {"status": "error", "message": "unknown scope"})
        return self._send(200, server.page(tenant, SCOPE_PATHS[what], query))

    def _refusal(self, dataset: Dataset, payload: dict[str, Any]) -> tuple[int, str] | None:
        if dataset.api_key is not None and self.headers.get("X-Api-Key") != dataset.api_key:
            return 401, "bad api key"
        if payload.get("shop") != dataset.shop:
            return 400, "unknown shop"
        return None

    def _fault(self, fault: Fault) -> bool:
        if fault.delay_s:
            time.sleep(fault.delay_s)
        if fault.reset:
            # SO_LINGER 0: close with RST, as a crashed or hostile server would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()
            self.close_connection = True
            return True
        if fault.status == 200 and fault.body is None:
            return False
        self._send_bytes(fault.status, fault.body or b"", fault.headers)
        return True

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        self._send_bytes(status, json.dumps(doc, ensure_ascii=False).encode(),
                         {"Content-Type": "application/json"})

    def _send_bytes(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _handler(server: TenantServer) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"tenants": server})


def main(argv: list[str] | None = None) -> int:
    """Serve example tenants until interrupted; prints the base URL on stdout."""
    parser = argparse.ArgumentParser(prog="python -m puller.tenant_server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tenant", action="append", default=[],
                        help="tenant id[:shop]; repeatable (default: demo:demo.example.com)")
    parser.add_argument("--customers", type=int, default=500)
    parser.add_argument("--orders", type=int, default=800)
    parser.add_argument("--products", type=int, default=120)
    parser.add_argument("--invalid-every", type=int, default=40)
    args = parser.parse_args(argv)
    server = TenantServer(port=args.port)
    for spec in args.tenant or ["demo:demo.example.com"]:
        tenant, _, shop = spec.partition(":")
        server.add(tenant, Dataset.generate(
            shop or f"{tenant}.example.com", customers=args.customers, orders=args.orders,
            products=args.products, invalid_every=args.invalid_every,
        ))
    print(server.url, flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
