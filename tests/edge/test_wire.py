"""Puller's requests and its reading of responses on a real socket (page_requests.PageRequests,
transport.GuardedTransport and Body): a loopback server that answers each request with
bytes scripted here, and records what it was sent."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from puller import client, errors
from puller.config import PullerConfig
from puller.domain import PageRequest, Scope

Answer = Callable[[asyncio.StreamWriter], Any]


class Scripted:
    """A loopback HTTP/1.1 server: the n-th request gets the n-th answer."""

    def __init__(self, answers: list[bytes | Answer]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.url = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers[len(self.requests) - 1]
                if isinstance(answer, bytes):
                    writer.write(answer)
                    await writer.drain()
                else:
                    await answer(writer)
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Scripted]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/export/customers?region=eu"
        async with server:
            yield self


def _ok(body: bytes, *headers: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            % len(body) + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body)


def _chunked(body: bytes, *headers: bytes) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                      for i in range(0, len(body), 1000))
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + chunks + b"0\r\n\r\n")


PAGE = orjson.dumps({"status": "success", "meta": {"has_next_page": False},
                     "data": [{"customer_id": f"c{i}"} for i in range(200)]})


async def _fetch(url: str, request: PageRequest, **callback: Any) -> bytes:
    config = PullerConfig.model_validate({
        "store": "sqlite:///unused.db", "allow_private_networks": True,
        "retry": {"attempts": 3, "initial_wait": 0.01, "max_wait": 0.02},
        "tenants": [{"id": "acme", "shop": "acme.test", "headers": {"X-Api-Key": "k1"},
                     "callbacks": {"customer": {"url": url, "page_size": 50, **callback}}}]})
    tenant = config.tenants[0]
    async with client.build_http_client(allow_private_networks=True, for_https=False) as http:
        source = client.CallbackSource(http, tenant=tenant, scope=Scope.CUSTOMER,
                                       callback=tenant.callbacks[Scope.CUSTOMER],
                                       policy=config.retry)
        return await source.fetch_page(request)


async def test_the_request_on_the_wire_and_the_body_read_whole() -> None:
    async with Scripted([_ok(PAGE), _ok(PAGE)]).running() as server:
        assert await _fetch(server.url, PageRequest(number=1, page_size=50, page=1)) == PAGE
        assert await _fetch(server.url, PageRequest(
            number=2, page_size=50, cursor="a/b c~%")) == PAGE
    first, second = server.requests
    line, *headers = first.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert line == b"POST /export/customers?region=eu&page_size=50&page=1 HTTP/1.1"
    names = {h.split(b":", 1)[0].lower(): h.split(b":", 1)[1].strip() for h in headers}
    assert names[b"host"] == server.url.split("/")[2].encode()
    assert names[b"x-api-key"] == b"k1"
    assert names[b"content-type"] == b"application/json"
    assert names[b"user-agent"] == client.USER_AGENT.encode()
    assert first.split(b"\r\n\r\n", 1)[1] == b'{"shop":"acme.test"}'
    assert names[b"content-length"] == b"20"
    assert second.startswith(
        b"POST /export/customers?region=eu&page_size=50&cursor=a%2Fb+c~%25 HTTP/1.1\r\n")


async def test_a_chunked_body_is_read_whole_and_a_gzip_one_decoded() -> None:
    async with Scripted([_chunked(PAGE), _ok(gzip.compress(PAGE), b"Content-Encoding: gzip"),
                         _chunked(gzip.compress(PAGE), b"Content-Encoding: gzip")]
                        ).running() as server:
        for number in (1, 2, 3):
            assert await _fetch(server.url, PageRequest(
                number=number, page_size=50, page=number)) == PAGE


@pytest.mark.parametrize("answer", [_chunked(PAGE), _chunked(b"x" * 400_000)],
                         ids=["page", "long"])
async def test_a_body_without_length_is_cut_at_the_cap(answer: bytes) -> None:
    async with Scripted([answer]).running() as server:
        with pytest.raises(errors.BrokenPageError, match="exceeds max_page_bytes=2048"):
            await _fetch(server.url, PageRequest(number=1, page_size=50, page=1),
                         max_page_bytes=2048)


async def test_a_gzip_bomb_is_stopped_at_the_cap_as_it_inflates() -> None:
    bomb = gzip.compress(b"0" * 20_000_000)
    async with Scripted([_chunked(bomb, b"Content-Encoding: gzip")]).running() as server:
        with pytest.raises(errors.BrokenPageError, match="exceeds max_page_bytes=1048576"):
            await _fetch(server.url, PageRequest(number=1, page_size=50, page=1),
                         max_page_bytes=1_048_576)


async def test_a_declared_length_over_the_cap_is_refused() -> None:
    async with Scripted([_ok(b"y" * 5000)]).running() as server:
        with pytest.raises(errors.BrokenPageError, match="exceeds max_page_bytes=2048"):
            await _fetch(server.url, PageRequest(number=1, page_size=50, page=1),
                         max_page_bytes=2048)


async def test_a_length_and_chunks_at_once_are_not_read_past_the_cap() -> None:
    """Content-Length and Transfer-Encoding together (request smuggling's shape): refused
    by aiohttp's parser, or read no further than the cap, never whole."""
    answer = _chunked(b"z" * 200_000, b"Content-Length: 100")
    async with Scripted([answer, answer, answer]).running() as server:
        with pytest.raises(errors.CallbackError):
            await _fetch(server.url, PageRequest(number=1, page_size=50, page=1),
                         max_page_bytes=4096)


async def test_a_connection_dropped_mid_body_is_retried() -> None:
    async def drop(writer: asyncio.StreamWriter) -> None:
        writer.write(_ok(PAGE)[:300])
        await writer.drain()

    async with Scripted([drop, _ok(PAGE)]).running() as server:
        assert await _fetch(server.url, PageRequest(number=1, page_size=50, page=1)) == PAGE
    assert len(server.requests) == 2
