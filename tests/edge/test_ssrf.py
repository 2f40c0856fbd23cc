"""The SSRF guard on every connection, with an injected resolver (no real DNS, no traffic)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpcore
import pytest

from puller import client, errors
from puller.client import GuardedBackend
from puller.config import PullerConfig
from puller.domain import PageRequest, Scope


class Recorder(httpcore.AsyncNetworkBackend):
    """An inner backend that records where it was asked to connect, and connects nowhere."""

    def __init__(self) -> None:
        self.connected: list[str] = []

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        self.connected.append(host)
        raise httpcore.ConnectError("recorder: not connecting anywhere")


def answers(*results: list[str]) -> Any:
    """A resolver that gives one answer per call, in order (DNS rebinding on cue)."""
    queue = list(results)

    async def resolver(host: str, port: int) -> list[str]:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return resolver


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["10.0.0.5"], ["169.254.169.254"], ["::1"], ["192.168.1.20"],
     ["93.184.216.34", "10.1.1.1"], ["::ffff:169.254.169.254"]],
    ids=["loopback", "ten-slash-8", "cloud-metadata", "ipv6-loopback", "private",
         "public-plus-private", "mapped-metadata"],
)
async def test_a_host_resolving_to_a_forbidden_address_is_refused(addresses: list[str]) -> None:
    """Any forbidden address among the answers refuses the connection; nothing connects."""
    inner = Recorder()
    guard = GuardedBackend(allow_private=False, resolver=answers(addresses), inner=inner)
    with pytest.raises(client._RefusedAddress) as info:
        await guard.connect_tcp("tenant.example", 443)
    assert info.value.address in addresses and inner.connected == []


async def test_the_connection_goes_to_the_checked_address_not_the_name() -> None:
    """The inner backend receives the IP that was checked, so DNS is not consulted again."""
    inner = Recorder()
    guard = GuardedBackend(allow_private=False, resolver=answers(["93.184.216.34"]), inner=inner)
    with pytest.raises(httpcore.ConnectError):
        await guard.connect_tcp("tenant.example", 443)
    assert inner.connected == ["93.184.216.34"]


async def test_dns_rebinding_between_connections_is_caught() -> None:
    """A name that turns private after a first public answer is refused on the next connect."""
    inner = Recorder()
    guard = GuardedBackend(allow_private=False, inner=inner,
                           resolver=answers(["93.184.216.34"], ["127.0.0.1"]))
    with pytest.raises(httpcore.ConnectError):
        await guard.connect_tcp("rebind.example", 443)
    with pytest.raises(client._RefusedAddress):
        await guard.connect_tcp("rebind.example", 443)
    assert inner.connected == ["93.184.216.34"]


async def test_allow_private_networks_lets_loopback_through() -> None:
    """With allow_private_networks the guard lets private addresses connect."""
    inner = Recorder()
    guard = GuardedBackend(allow_private=True, resolver=answers(["127.0.0.1"]), inner=inner)
    with pytest.raises(httpcore.ConnectError):
        await guard.connect_tcp("localhost", 80)
    assert inner.connected == ["127.0.0.1"]


async def test_a_refusal_is_a_terminal_error_naming_host_address_and_the_switch() -> None:
    """Through the real client: ForbiddenAddressError, not retried, says what to do."""
    config = PullerConfig.model_validate({"tenants": [{"id": "acme", "shop": "s", "callbacks": {
        "customer": {"url": "https://metadata.tenant.example/export"}}}]})
    tenant = config.tenants[0]
    calls = 0

    async def resolver(host: str, port: int) -> list[str]:
        nonlocal calls
        calls += 1
        return ["169.254.169.254"]

    async with client.build_http_client(allow_private_networks=False,
                                        resolver=resolver) as http:
        source = client.CallbackSource(http, tenant=tenant, scope=Scope.CUSTOMER,
                                       callback=tenant.callbacks[Scope.CUSTOMER],
                                       policy=config.retry)
        with pytest.raises(errors.ForbiddenAddressError) as info:
            await source.fetch_page(PageRequest(number=1, page_size=10, page=1))
    message = str(info.value)
    assert "metadata.tenant.example" in message and "169.254.169.254" in message
    assert "allow_private_networks" in message and calls == 1
