"""Property-based: validation and config loading never crash on arbitrary input."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puller import errors
from puller.config import PullerConfig, load_config
from puller.domain import Scope
from puller.records import validate_page
from puller.tenant_server import make_customer, make_order, make_product

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELDS = sorted({*make_customer(0), *make_order(0), *make_product(0), "deleted_at"})


@st.composite
def records(draw: st.DrawFn) -> Any:
    """Arbitrary JSON, or a valid record with some fields replaced by arbitrary JSON."""
    if draw(st.booleans()):
        return draw(json_values)
    base = draw(st.sampled_from([make_customer(1), make_order(1), make_product(1)]))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        base[field] = draw(json_values)
    return base


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(raws=st.lists(records(), max_size=8), scope=st.sampled_from(list(Scope)),
       normalize=st.booleans())
def test_validation_never_raises_and_accounts_for_every_record(
    raws: list[Any], scope: Scope, normalize: bool
) -> None:
    """Any page validates without raising; every record is accepted or rejected with reasons."""
    page = validate_page(scope, raws, normalize_case=normalize)
    positions = sorted([a.position for a in page.accepted] + [r.position for r in page.rejections])
    assert positions == list(range(len(raws)))
    assert all(r.reasons and all(isinstance(x, str) and x for x in r.reasons)
               for r in page.rejections)


yaml_docs = st.one_of(
    st.text(max_size=200),
    json_values.map(yaml.safe_dump),
    st.fixed_dictionaries({}, optional={
        "store": json_values, "retry": json_values, "worker": json_values,
        "tenants": st.lists(st.fixed_dictionaries({}, optional={
            "id": json_values | st.text(max_size=10), "shop": json_values,
            "headers": json_values, "callbacks": json_values | st.dictionaries(
                st.sampled_from(["customer", "2", "product", "x"]), json_values, max_size=3),
        }), max_size=3),
    }).map(yaml.safe_dump),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(text=yaml_docs, env=st.dictionaries(st.from_regex(r"[A-Z]{1,5}", fullmatch=True),
                                           st.text(max_size=10), max_size=3))
def test_config_loader_never_crashes(text: str, env: dict[str, str]) -> None:
    """Any YAML text gives a config or a ConfigError, never another exception."""
    try:
        result = load_config(text, env)
    except errors.ConfigError as exc:
        assert str(exc).startswith("config ")
    else:
        assert isinstance(result, PullerConfig)
