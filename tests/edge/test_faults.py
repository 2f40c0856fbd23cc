"""Edge cases a real server cannot produce on cue, with respx: exact retries, resets, bombs."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import respx
import sqlalchemy as sa
from pydantic import SecretStr

from puller import client, errors, schema, transport
from puller.config import PullerConfig
from puller.domain import PageRequest, RunResult, Scope
from puller.store import Store
from puller.tenant_server import make_customer
from tests.conftest import pull_one

URL = "https://tenant.test/export/customers"
FIRST = PageRequest(number=1, page_size=2, page=1)


def _config(store_url: str, **callback: Any) -> PullerConfig:
    return PullerConfig.model_validate({
        "store": store_url,
        "retry": {"attempts": 4, "initial_wait": 0.01, "max_wait": 0.02},
        "tenants": [{"id": "acme", "shop": "acme.test", "callbacks": {
            "customer": {"url": URL, "page_size": 2, **callback}}}],
    })


def _page(records: list[Any], *, more: bool, cursor: str | None = None) -> bytes:
    return orjson.dumps({"status": "success", "meta": {"has_next_page": more, "cursor": cursor},
                         "data": records})


class Sleeps:
    """An injected tenacity sleep: records waits instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    # puller sends each request through its own transport (transport.GuardedTransport, httpx's
    # transport API): the router answers there, in place of the network.
    with respx.mock(assert_all_called=False, using=None) as router:
        async def answer(_transport: transport.GuardedTransport,
                         request: httpx.Request) -> httpx.Response:
            return await router.async_handler(request)

        monkeypatch.setattr(transport.GuardedTransport, "handle_async_request", answer)
        yield router


async def _fetch(config: PullerConfig, sleeps: Sleeps, request: PageRequest = FIRST) -> bytes:
    tenant = config.tenants[0]
    async with client.build_http_client(allow_private_networks=False) as http:
        source = client.CallbackSource(http, tenant=tenant, scope=Scope.CUSTOMER,
                                       callback=tenant.callbacks[Scope.CUSTOMER],
                                       policy=config.retry, sleep=sleeps)
        return await source.fetch_page(request)


async def _pull(config: PullerConfig, store: Store, sleeps: Sleeps) -> RunResult:
    return await pull_one(config, store, sleep=sleeps)


def _count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(schema.customers))
                   .scalar_one())


async def test_429_waits_for_retry_after_seconds(mock: respx.MockRouter, store_url: str) -> None:
    """429 with Retry-After: 7 waits at least 7 s (injected sleep), then succeeds."""
    route = mock.post(URL).mock(side_effect=[
        httpx.Response(429, headers={"Retry-After": "7"}),
        httpx.Response(200, content=_page([], more=False)),
    ])
    sleeps = Sleeps()
    await _fetch(_config(store_url), sleeps)
    assert route.call_count == 2 and sleeps.waits == [7.0]


async def test_429_waits_for_retry_after_http_date(mock: respx.MockRouter, store_url: str) -> None:
    """Retry-After as an HTTP-date in the past means retry now (after the backoff)."""
    mock.post(URL).mock(side_effect=[
        httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
        httpx.Response(200, content=_page([], more=False)),
    ])
    sleeps = Sleeps()
    await _fetch(_config(store_url), sleeps)
    assert len(sleeps.waits) == 1 and sleeps.waits[0] <= 0.02


async def test_burst_of_500s_is_ridden_out(mock: respx.MockRouter, store_url: str) -> None:
    """Three 5xx then success: retried with growing, capped, jittered waits."""
    route = mock.post(URL).mock(side_effect=[
        httpx.Response(500), httpx.Response(502), httpx.Response(504),
        httpx.Response(200, content=_page([], more=False)),
    ])
    sleeps = Sleeps()
    await _fetch(_config(store_url), sleeps)
    assert route.call_count == 4 and len(sleeps.waits) == 3
    assert all(0 <= w <= 0.02 for w in sleeps.waits)


async def test_persistent_503_fails_after_the_attempts(
    mock: respx.MockRouter, store_url: str
) -> None:
    """After `attempts` tries a transient failure fails, naming tenant, scope, page and cause."""
    route = mock.post(URL).mock(return_value=httpx.Response(503))
    with pytest.raises(errors.TransientCallbackError) as info:
        await _fetch(_config(store_url), Sleeps())
    assert route.call_count == 4
    assert str(info.value).startswith("tenant acme, scope customer, page 1: HTTP 503 from POST "
                                      "/export/customers")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
async def test_other_4xx_is_not_retried(
    mock: respx.MockRouter, store_url: str, status: int
) -> None:
    """4xx other than 408/429 fails at once."""
    route = mock.post(URL).mock(return_value=httpx.Response(status))
    with pytest.raises(errors.FatalCallbackError, match=f"HTTP {status}"):
        await _fetch(_config(store_url), Sleeps())
    assert route.call_count == 1


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow"),
     httpx.ReadError("connection reset by peer"), httpx.RemoteProtocolError("eof")],
    ids=["connect", "read-timeout", "connect-timeout", "reset", "protocol"],
)
async def test_transport_errors_are_transient(
    mock: respx.MockRouter, store_url: str, exc: Exception
) -> None:
    """Connect errors, timeouts and resets are retried, then succeed."""
    done = httpx.Response(200, content=_page([], more=False))
    route = mock.post(URL).mock(side_effect=[exc, done])
    await _fetch(_config(store_url), Sleeps())
    assert route.call_count == 2


class _ResetMidBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"meta": {"has_next_page": false}, "data": [{"custo'
        raise httpx.ReadError("connection reset by peer")


async def test_reset_mid_body_is_retried(mock: respx.MockRouter, store_url: str) -> None:
    """A connection reset while reading the body is transient, and the page is re-fetched."""
    route = mock.post(URL).mock(side_effect=[
        httpx.Response(200, stream=_ResetMidBody()),
        httpx.Response(200, content=_page([], more=False)),
    ])
    assert orjson.loads(await _fetch(_config(store_url), Sleeps()))["data"] == []
    assert route.call_count == 2


async def test_oversized_declared_body_is_refused(mock: respx.MockRouter, store_url: str) -> None:
    """A Content-Length over max_page_bytes is refused before reading."""
    mock.post(URL).mock(return_value=httpx.Response(
        200, content=b"x" * 5000, headers={"Content-Length": "5000"}))
    with pytest.raises(errors.BrokenPageError, match="exceeds max_page_bytes=2048"):
        await _fetch(_config(store_url, max_page_bytes=2048), Sleeps())


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunk: bytes, count: int) -> None:
        self.chunk, self.count, self.sent = chunk, count, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.sent += 1
            yield self.chunk


async def test_oversized_streamed_body_is_cut_at_the_cap(
    mock: respx.MockRouter, store_url: str
) -> None:
    """Without Content-Length the body is counted while read and cut at the cap."""
    stream = _Chunks(b"y" * 1024, 1000)
    mock.post(URL).mock(return_value=httpx.Response(200, stream=stream))
    with pytest.raises(errors.BrokenPageError, match="exceeds max_page_bytes=4096"):
        await _fetch(_config(store_url, max_page_bytes=4096), Sleeps())
    assert stream.sent < 10, "reading stopped at the cap, not at the end"


async def test_gzip_bomb_is_stopped_at_the_cap_as_it_inflates(
    mock: respx.MockRouter, store_url: str
) -> None:
    """A small gzip body inflating past max_page_bytes is refused (counted decoded)."""
    bomb = gzip.compress(b"0" * 20_000_000)
    assert len(bomb) < 100_000
    mock.post(URL).mock(return_value=httpx.Response(
        200, stream=_Chunks(bomb, 1), headers={"Content-Encoding": "gzip"}))
    with pytest.raises(errors.BrokenPageError, match="exceeds max_page_bytes=1048576"):
        await _fetch(_config(store_url, max_page_bytes=1_048_576), Sleeps())


async def test_corrupt_gzip_is_a_broken_page(mock: respx.MockRouter, store_url: str) -> None:
    """A body that claims gzip but is not is broken, not a crash."""
    mock.post(URL).mock(return_value=httpx.Response(
        200, stream=_Chunks(b"not gzip at all", 1), headers={"Content-Encoding": "gzip"}))
    with pytest.raises(errors.BrokenPageError, match="could not be decoded"):
        await _fetch(_config(store_url), Sleeps())


@pytest.mark.parametrize(
    ("second_page", "fragment"),
    [
        (b'{"meta": {"has_next_page": false}, "data": [{"customer_id": "c', "not JSON"),
        (b"<!doctype html><html><body>Please log in</body></html>", "not JSON"),
        (b'{"meta": {"page": 2}, "data": []}', "`meta.has_next_page` is missing"),
        (b'{"meta": {"has_next_page": "no"}, "data": []}', "not true/false"),
        (b'{"meta": {"has_next_page": false}, "data": "none"}', "`data` is a string"),
        (b'{"data": []}', "`meta` is missing"),
    ],
    ids=["truncated-json", "html-200", "no-has-next-page", "has-next-string", "data-not-list",
         "no-meta"],
)
async def test_broken_page_fails_the_run_and_applies_nothing_of_it(
    mock: respx.MockRouter, store_url: str, store: Store, second_page: bytes, fragment: str
) -> None:
    """A broken page fails the run with tenant, scope, page and cause; earlier pages stay."""
    mock.post(URL).mock(side_effect=[
        httpx.Response(200, content=_page([make_customer(1), make_customer(2)], more=True)),
        httpx.Response(200, content=second_page),
    ])
    result = await _pull(_config(store_url), store, Sleeps())
    assert result.status == "failed" and result.error is not None
    assert result.error.startswith("tenant acme, scope customer, page 2: ")
    assert fragment in result.error
    assert _count(store) == 2
    assert store.load_checkpoint("acme", Scope.CUSTOMER).next_page == 2


async def test_repeated_cursor_fails_the_run(
    mock: respx.MockRouter, store_url: str, store: Store
) -> None:
    """A cursor that comes back is a loop: the run fails at that page; nothing of it applies."""
    mock.post(URL).mock(side_effect=[
        httpx.Response(200, content=_page([make_customer(1)], more=True, cursor="A")),
        httpx.Response(200, content=_page([make_customer(2)], more=True, cursor="B")),
        httpx.Response(200, content=_page([make_customer(3)], more=True, cursor="A")),
    ])
    result = await _pull(_config(store_url, pagination="cursor"), store, Sleeps())
    assert result.status == "failed" and result.error is not None
    assert "cursor 'A' repeated" in result.error and "page 3" in result.error
    assert _count(store) == 2


async def test_redirect_is_not_followed(mock: respx.MockRouter, store_url: str) -> None:
    """A 301 is an error telling the operator to register the final URL."""
    route = mock.post(URL).mock(return_value=httpx.Response(
        301, headers={"Location": "https://elsewhere.test/x?token=abc"}))
    with pytest.raises(errors.FatalCallbackError, match="register the final URL") as info:
        await _fetch(_config(store_url), Sleeps())
    assert "token=abc" not in str(info.value) and route.call_count == 1


async def test_a_query_in_the_callback_or_commit_url_is_kept(
    mock: respx.MockRouter, store_url: str, store: Store
) -> None:
    """A URL's own query (a region, a token) survives: the page's parameters are added to
    it, and the acknowledgement goes to commit_url with its query intact."""
    pages = mock.post(url__startswith=URL).mock(
        return_value=httpx.Response(200, content=_page([make_customer(1)], more=False)))
    acks = mock.post(url__startswith="https://tenant.test/ack").mock(
        return_value=httpx.Response(200))
    config = _config(store_url, url=f"{URL}?region=eu",
                     commit_url="https://tenant.test/ack?token=t1")
    result = await _pull(config, store, Sleeps())
    assert result.status == "succeeded"
    assert dict(pages.calls.last.request.url.params) == {"region": "eu", "page": "1",
                                                         "page_size": "2"}
    assert dict(acks.calls.last.request.url.params) == {"token": "t1"}


@pytest.mark.parametrize("cursor", ["o50", "a b+c/d=e&f", "ünï", "x%20y"])
async def test_page_parameters_are_encoded_as_httpx_encodes_them(
    mock: respx.MockRouter, store_url: str, cursor: str
) -> None:
    """The query appended as text equals what httpx's own params encoding sends."""
    route = mock.post(URL).mock(return_value=httpx.Response(200, content=_page([], more=False)))
    await _fetch(_config(store_url), Sleeps(), PageRequest(number=2, page_size=2, cursor=cursor))
    expected = httpx.Request("POST", URL, params={"page_size": "2", "cursor": cursor}).url
    assert route.calls.last.request.url == expected


async def test_request_carries_shop_body_headers_and_page_params(
    mock: respx.MockRouter, store_url: str
) -> None:
    """POST with {"shop": ...}, the tenant's headers, and page/page_size."""
    route = mock.post(URL).mock(return_value=httpx.Response(200, content=_page([], more=False)))
    config = _config(store_url).model_copy()
    tenant = config.tenants[0].model_copy(update={"headers": {"X-Api-Key": SecretStr("k-1")}})
    config = config.model_copy(update={"tenants": [tenant]})
    await _fetch(config, Sleeps(), PageRequest(number=4, page_size=2, page=4))
    sent = route.calls.last.request
    assert orjson.loads(sent.content) == {"shop": "acme.test"}
    assert sent.headers["X-Api-Key"] == "k-1"
    assert sent.headers["Content-Type"] == "application/json"
    assert dict(sent.url.params) == {"page": "4", "page_size": "2"}


async def test_a_tenants_cookie_is_never_kept_or_sent(
    mock: respx.MockRouter, store_url: str, store: Store
) -> None:
    """Set-Cookie from a callback is ignored: the next request carries no Cookie header
    (the protocol has no cookies, and the client may be shared with other tenants)."""
    route = mock.post(URL).mock(side_effect=[
        httpx.Response(200, content=_page([make_customer(1)], more=True),
                       headers={"Set-Cookie": "session=s3cret; Path=/"}),
        httpx.Response(200, content=_page([make_customer(2)], more=False)),
    ])
    result = await _pull(_config(store_url), store, Sleeps())
    assert result.status == "succeeded"
    assert [call.request.headers.get("Cookie") for call in route.calls] == [None, None]


async def test_parallel_pages_drops_what_it_asked_beyond_the_end(
    mock: respx.MockRouter, store_url: str, store: Store
) -> None:
    """Pages asked for ahead that turn out to lie beyond the end are dropped, even when the
    tenant answers them with errors: the run succeeds with exactly the real pages."""
    answers = {
        "1": httpx.Response(200, content=_page([make_customer(1), make_customer(2)], more=True)),
        "2": httpx.Response(200, content=_page([make_customer(3)], more=False)),
        "3": httpx.Response(404, content=b"no such page"),
        "4": httpx.Response(500, content=b"boom"),
    }
    route = mock.post(url__startswith=URL).mock(
        side_effect=lambda request: answers[request.url.params["page"]])
    config = _config(store_url, parallel_pages=4)
    result = await _pull(config, store, Sleeps())
    assert result.status == "succeeded", result.error
    assert result.stats is not None and result.stats.pages == 2
    assert _count(store) == 3
    assert {c.request.url.params["page"] for c in route.calls} <= set(answers)


@pytest.mark.parametrize(("callback", "problem"), [
    ({"pagination": "cursor", "parallel_pages": 2}, "parallel_pages needs pagination: page"),
    ({"commit_url": "https://tenant.test/ack", "parallel_pages": 2}, "cannot be used with"),
    ({"prefetch": 1, "parallel_pages": 4}, "needs prefetch of at least 3"),
])
def test_parallel_pages_refuses_what_it_cannot_do(callback: dict[str, Any], problem: str) -> None:
    """Cursor mode, commit_url, or too little prefetch: a config error saying what to change."""
    with pytest.raises(ValueError, match=problem):
        _config("sqlite:///unused.db", **callback)
