"""httpx over aiohttp for puller's requests, every connection through the address guard
(SPEC's SSRF rule): a host name's addresses are checked as it resolves (GuardedResolver)
and aiohttp connects to exactly those, an IP literal is checked before the request
(GuardedTransport). client builds on it; it is imported through client, whose imports
leave out of httpx and aiohttp the parts that puller never uses (imports.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions
from multidict import CIMultiDict

MAX_CONNECTIONS = 100
KEEPALIVE_S = 5.0


class RefusedAddress(Exception):
    """A connection to a forbidden address (is_forbidden), refused before it was made."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} -> {address}")
        self.host = host
        self.address = address


def is_forbidden(address: str) -> bool:
    """Loopback, private, link-local (incl. cloud metadata), multicast, reserved, unspecified."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of `host`, as the system resolver returns them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for puller: refuses forbidden addresses; aiohttp then connects to
    exactly the addresses returned here, the checked ones.

    Connecting to the very address that was checked closes the DNS-rebinding gap between
    check and connect; TLS still verifies the certificate against the host name (SNI).
    The connector keeps no DNS cache, so every new connection is checked again. A host
    that is an IP literal never reaches a resolver: `GuardedTransport` checks it.
    """

    def __init__(self, *, allow_private: bool, resolver: Resolver = resolve) -> None:
        self._allow_private = allow_private
        self._resolve = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        addresses = await self._resolve(host, port)  # OSError: aiohttp says DNS failed
        if not self._allow_private:
            for address in addresses:
                if is_forbidden(address):
                    raise RefusedAddress(host, address)
        return [ResolveResult(hostname=host, host=address, port=port,
                              family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST) for address in addresses]

    async def close(self) -> None:
        return None


class GuardedTransport(AiohttpTransport):
    """httpx over aiohttp (httpx-aiohttp): the same httpx API, about half the CPU time a
    request of httpx's own async transport (httpcore on anyio) in scripts/bench; a pull
    at page size 50 is CPU-bound on exactly that. Every connection passes the guard:
    names through `GuardedResolver`, IP literals here."""

    def __init__(self, *, allow_private: bool, tls: ssl.SSLContext, resolver: Resolver) -> None:
        self._allow_private = allow_private
        self.tls = tls

        def session() -> aiohttp.ClientSession:  # built inside the event loop, on first use
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(allow_private=allow_private, resolver=resolver),
                use_dns_cache=False, ssl=tls, limit=MAX_CONNECTIONS,
                keepalive_timeout=KEEPALIVE_S)
            # No cookie jar (the protocol has none; a tenant's cookie is never sent back)
            # and no proxy from the environment.
            return aiohttp.ClientSession(connector=connector, trust_env=False,
                                         cookie_jar=aiohttp.DummyCookieJar())

        super().__init__(verify=tls, trust_env=False, client=session)
        self._timeouts: dict[tuple[tuple[str, Any], ...], aiohttp.ClientTimeout] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx-aiohttp's own, for the requests puller sends (a body of bytes, no proxy),
        with the response's body in a `Body`, which puller reads without httpx's layers
        (`_read_capped`). aiohttp takes the URL as httpx wrote it (encoded), and the
        timeouts once built; httpx decodes the body (Content-Encoding), not aiohttp."""
        host = request.url.host
        if not self._allow_private and _is_ip(host) and is_forbidden(host):
            raise RefusedAddress(host, host)
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        timeouts = tuple(request.extensions.get("timeout", {}).items())
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            given = dict(timeouts)
            timeout = self._timeouts[timeouts] = aiohttp.ClientTimeout(
                sock_connect=given.get("connect"), sock_read=given.get("read"),
                connect=given.get("pool"))
        with map_aiohttp_exceptions():
            response = await self.client.request(
                request.method, yarl.URL(str(request.url), encoded=True),
                headers=CIMultiDict(request.headers.multi_items()),
                data=request.content or None, allow_redirects=False, auto_decompress=False,
                compress=False, timeout=timeout)
        return httpx.Response(response.status, headers=response.raw_headers,
                              stream=Body(response), request=request,
                              extensions={"http_version": b"HTTP/1.1"})


class Body(AiohttpResponseStream):
    """A response's body from aiohttp, as httpx-aiohttp streams it, and read whole."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(response)
        self._response = response

    async def read_capped(self, cap: int) -> bytes | None:
        """The body as it came, or None once it is longer than `cap` bytes (read no
        further). httpx's aiter_bytes steps it through httpx's stream, decoder and
        chunker as well: with this, a request of puller's client at page size 50 took
        13% fewer instructions (callgrind: 732k -> 638k)."""
        chunks: list[bytes] = []
        total = 0
        with map_aiohttp_exceptions():
            async for chunk in self._response.content.iter_any():
                total += len(chunk)
                if total > cap:
                    return None
                chunks.append(chunk)
        return b"".join(chunks)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone id: fe80::1%eth0
    except ValueError:
        return False
    return True
