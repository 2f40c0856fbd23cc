"""The SSRF guard on every connection, with an injected resolver (no real DNS, no traffic)."""

from __future__ import annotations

from typing import Any

import pytest

from puller import client, errors, transport
from puller.config import PullerConfig
from puller.domain import PageRequest, Scope
from puller.transport import GuardedResolver


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
    """Any forbidden address among the answers refuses the connection: none is returned."""
    guard = GuardedResolver(allow_private=False, resolver=answers(addresses))
    with pytest.raises(transport.RefusedAddress) as info:
        await guard.resolve("tenant.example", 443)
    assert info.value.address in addresses


async def test_the_connection_goes_to_the_checked_address_not_the_name() -> None:
    """aiohttp connects to the `host` of each answer: the checked IP, never the name again."""
    guard = GuardedResolver(allow_private=False,
                            resolver=answers(["93.184.216.34", "2606:2800:220:1::"]))
    got = await guard.resolve("tenant.example", 443)
    assert [(r["host"], r["hostname"], r["port"]) for r in got] == [
        ("93.184.216.34", "tenant.example", 443), ("2606:2800:220:1::", "tenant.example", 443)]


async def test_dns_rebinding_between_connections_is_caught() -> None:
    """A name that turns private after a first public answer is refused on the next connect."""
    guard = GuardedResolver(allow_private=False,
                            resolver=answers(["93.184.216.34"], ["127.0.0.1"]))
    assert [r["host"] for r in await guard.resolve("rebind.example", 443)] == ["93.184.216.34"]
    with pytest.raises(transport.RefusedAddress):
        await guard.resolve("rebind.example", 443)


async def test_allow_private_networks_lets_loopback_through() -> None:
    """With allow_private_networks the guard lets private addresses connect."""
    guard = GuardedResolver(allow_private=True, resolver=answers(["127.0.0.1"]))
    assert [r["host"] for r in await guard.resolve("localhost", 80)] == ["127.0.0.1"]


def _source(http: Any, url: str) -> client.CallbackSource:
    config = PullerConfig.model_validate({"tenants": [{"id": "acme", "shop": "s", "callbacks": {
        "customer": {"url": url}}}]})
    tenant = config.tenants[0]
    return client.CallbackSource(http, tenant=tenant, scope=Scope.CUSTOMER,
                                 callback=tenant.callbacks[Scope.CUSTOMER], policy=config.retry)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "http://127.0.0.1:9/x",
                                 "http://[::1]:9/x", "http://10.0.0.1/x"],
                         ids=["metadata", "loopback", "ipv6-loopback", "private"])
async def test_an_ip_literal_url_is_refused_without_a_resolver(url: str) -> None:
    """An IP in the URL never reaches a resolver (aiohttp skips it): the transport refuses."""
    async def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError("an IP literal must not be resolved")

    async with client.build_http_client(allow_private_networks=False, resolver=no_dns) as http:
        with pytest.raises(errors.ForbiddenAddressError) as info:
            await _source(http, url).fetch_page(PageRequest(number=1, page_size=10, page=1))
    assert "allow_private_networks" in str(info.value)


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
