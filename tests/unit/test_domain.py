"""Scopes and import order."""

from __future__ import annotations

import pytest

from puller import errors
from puller.domain import Scope, import_waves


@pytest.mark.parametrize(
    ("value", "expected"),
    [("customer", Scope.CUSTOMER), (1, Scope.CUSTOMER), ("2", Scope.ORDER),
     ("Product", Scope.PRODUCT), (3, Scope.PRODUCT)],
    ids=["name", "int-id", "str-id", "case", "product-id"],
)
def test_scope_parses_name_or_id(value: object, expected: Scope) -> None:
    """A scope is named by name or by id; the names are authoritative (2 is order)."""
    assert Scope.parse(value) is expected


def test_unknown_scope_lists_the_valid_ones() -> None:
    """An unknown scope fails with the valid choices."""
    with pytest.raises(errors.ConfigError, match=r"customer \(1\), order \(2\), product \(3\)"):
        Scope.parse("orders")


@pytest.mark.parametrize(
    ("scopes", "waves"),
    [
        ([Scope.ORDER, Scope.CUSTOMER, Scope.PRODUCT],
         [[Scope.CUSTOMER, Scope.PRODUCT], [Scope.ORDER]]),
        ([Scope.ORDER], [[Scope.ORDER]]),
        ([Scope.PRODUCT, Scope.ORDER], [[Scope.PRODUCT], [Scope.ORDER]]),
        ([], []),
    ],
    ids=["all", "order-only", "product-then-order", "none"],
)
def test_import_waves_put_order_after_customer_and_product(
    scopes: list[Scope], waves: list[list[Scope]]
) -> None:
    """SPEC §4: customer and product first (together), order after both."""
    assert import_waves(scopes) == waves
