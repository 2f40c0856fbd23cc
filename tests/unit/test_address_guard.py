"""The SSRF guard's address rule (transport.is_forbidden), table-driven."""

from __future__ import annotations

import pytest

from puller.transport import is_forbidden


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
     ("169.254.169.254", True), ("::1", True), ("fe80::1%eth0", True), ("0.0.0.0", True),
     ("::ffff:127.0.0.1", True), ("224.0.0.1", True), ("100.64.0.1", True), ("fd00::1", True),
     ("93.184.216.34", False), ("2606:2800:220:1:248:1893:25c8:1946", False)],
    ids=str,
)
def test_ssrf_guard_refuses_non_public_addresses(address: str, forbidden: bool) -> None:
    """Loopback, private, link-local/metadata, CGNAT, mapped and multicast are refused."""
    assert is_forbidden(address) is forbidden
