"""Config loading: validation with key paths, ${VAR} from env, overrides, secrets kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from puller import errors
from puller.config import _FAST_LOADER, _parse_yaml, dialect_of, load_config, parse_duration_s
from puller.domain import Scope

GOOD = """
store: sqlite:///var/x.db
tenants:
  - id: acme
    shop: acme.example.com
    headers:
      X-Api-Key: ${ACME_API_KEY}
    callbacks:
      customer:
        url: https://acme.example.com/export/customers
        pagination: page
        page_size: 50
        schedule: {every: 15m}
        commit_url: https://acme.example.com/export/commit
      2: {url: "https://acme.example.com/export/orders", pagination: cursor, page_size: 100,
          schedule: {cron: "*/15 * * * *"}}
"""
ENV = {"ACME_API_KEY": "s3cr3t-omega"}


def test_good_config_parses_scopes_by_name_or_id() -> None:
    """Scopes may be keyed by name or id; env references are substituted."""
    config = load_config(GOOD, ENV)
    tenant = config.tenant("acme")
    assert set(tenant.callbacks) == {Scope.CUSTOMER, Scope.ORDER}
    assert tenant.callbacks[Scope.ORDER].pagination == "cursor"
    assert tenant.callbacks[Scope.CUSTOMER].schedule is not None
    assert tenant.callbacks[Scope.CUSTOMER].schedule.every_s == 900
    assert tenant.header_values() == {"X-Api-Key": "s3cr3t-omega"}


@pytest.mark.parametrize("value", ["line\r\nX-Evil: 1", "clé"], ids=["crlf", "non-ascii"])
def test_header_values_must_be_safe_ascii_and_are_not_echoed(value: str) -> None:
    """A header value with a line break or non-ASCII is refused without printing it."""
    with pytest.raises(errors.ConfigError) as info:
        load_config(GOOD, {"ACME_API_KEY": value})
    assert info.value.path == "tenants[0].headers"
    assert "printable ASCII" in str(info.value) and value not in str(info.value)


def test_secret_never_appears_in_repr() -> None:
    """Header values are secrets: repr/str of the config never shows them."""
    config = load_config(GOOD, ENV)
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config)


def test_example_config_is_valid() -> None:
    """config/puller.example.yaml documents every key and loads."""
    text = (Path(__file__).parents[2] / "config" / "puller.example.yaml").read_text()
    config = load_config(text, {"ACME_API_KEY": "k", "GLOBEX_TOKEN": "t"})
    assert config.tenants


def test_store_url_env_overrides_the_file() -> None:
    """PULLER_STORE_URL overrides `store`."""
    config = load_config(GOOD, {**ENV, "PULLER_STORE_URL": "sqlite:///other.db"})
    assert config.store == "sqlite:///other.db"


@pytest.mark.parametrize(
    ("text", "env", "path", "fragment"),
    [
        (GOOD, {}, "tenants[0].headers.X-Api-Key", "ACME_API_KEY is not set"),
        (GOOD.replace("pagination: page", "pagination: pages"), ENV,
         "tenants[0].callbacks.customer.pagination", "'page' or 'cursor'"),
        (GOOD.replace("https://acme.example.com/export/customers", "ftp://x/y"), ENV,
         "tenants[0].callbacks.customer.url", "http:// or https://"),
        (GOOD.replace("https://acme.example.com/export/customers", "https://u:p@x/y"), ENV,
         "tenants[0].callbacks.customer.url", "must not carry credentials"),
        (GOOD.replace("customer:", "custmer:"), ENV, "tenants[0].callbacks", "unknown scope"),
        (GOOD.replace("page_size: 50", "page_size: 0"), ENV,
         "tenants[0].callbacks.customer.page_size", "greater than or equal to 1"),
        (GOOD.replace("{every: 15m}", "{every: soon}"), ENV,
         "tenants[0].callbacks.customer.schedule.every", "not a duration"),
        (GOOD.replace('"*/15 * * * *"', '"* *"'), ENV, "tenants[0].callbacks.order.schedule",
         "needs 5 fields"),
        (GOOD.replace("id: acme", "id: Acme Corp"), ENV, "tenants[0].id", "should match"),
        (GOOD.replace("    shop:", "    sohp: x\n    shop:"), ENV, "tenants[0].sohp",
         "unknown key"),
        (GOOD + "  - id: acme\n    shop: b\n    callbacks: {product: {url: 'http://b/p'}}\n",
         ENV, "tenants", "used twice"),
        ("tenants: [\n", ENV, "line", "fix the YAML syntax"),
        ("- just\n- a list\n", ENV, "(top)", "mapping"),
    ],
    ids=["missing-env", "bad-pagination", "bad-scheme", "credentials-in-url", "unknown-scope",
         "zero-page-size", "bad-duration", "bad-cron", "bad-tenant-id", "typo-key",
         "duplicate-tenant", "bad-yaml", "not-a-mapping"],
)
def test_errors_name_the_key_path(text: str, env: dict[str, str], path: str, fragment: str) -> None:
    """Every config error names the offending key and what is wrong."""
    with pytest.raises(errors.ConfigError) as info:
        load_config(text, env)
    assert info.value.path.startswith(path), info.value.path
    assert fragment in str(info.value)
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2s", 2.0), ("15m", 900.0), ("2h", 7200.0), ("1d", 86400.0), ("0.5s", 0.5), (30, 30.0)],
    ids=["s", "m", "h", "d", "fraction", "bare-number"],
)
def test_durations_accept_s_m_h_d(value: object, seconds: float) -> None:
    """Durations are a number with unit s, m, h or d."""
    assert parse_duration_s(value) == seconds


@pytest.mark.parametrize(
    "value", ["0s", "-1m", "5 weeks", True], ids=["zero", "neg", "unit", "bool"]
)
def test_bad_durations_are_refused(value: object) -> None:
    """Zero, negative or unit-less nonsense is not a duration."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration_s(value)


def test_unknown_tenant_lists_the_configured_ones() -> None:
    """Asking for an unknown tenant lists the configured ids."""
    with pytest.raises(errors.ConfigError, match="configured: acme"):
        load_config(GOOD, ENV).tenant("globex")


def test_worker_and_retention_sections_have_defaults_and_parse_durations() -> None:
    """worker: and retention: are optional; durations take s/m/h/d; zero jitter is allowed."""
    config = load_config(GOOD, ENV)
    assert (config.worker.max_concurrent_runs, config.worker.max_runs_per_tenant) == (8, 2)
    assert config.worker.metrics_port == 0 and config.worker.shutdown_grace_s == 30
    assert config.retention.soft_deleted_s == 90 * 86400
    tuned = load_config(GOOD + "worker: {shutdown_grace: 2m, startup_jitter: 0, "
                        "metrics_port: 9464}\nretention: {soft_deleted: 30d, rejected: 12h}\n",
                        ENV)
    assert tuned.worker.shutdown_grace_s == 120 and tuned.worker.startup_jitter_s == 0
    assert tuned.worker.metrics_port == 9464
    assert (tuned.retention.soft_deleted_s, tuned.retention.rejected_s) == (2592000, 43200)


@pytest.mark.parametrize(
    ("extra", "path"),
    [("worker: {max_concurrent_runs: 0}", "worker.max_concurrent_runs"),
     ("worker: {metrics_port: 70000}", "worker.metrics_port"),
     ("worker: {shutdown_grace: forever}", "worker.shutdown_grace"),
     ("worker: {maintenance_cron: daily}", "worker.maintenance_cron"),
     ("retention: {rejected: -1d}", "retention.rejected")],
    ids=["zero-cap", "port-range", "bad-grace", "bad-cron", "negative-retention"],
)
def test_worker_and_retention_errors_name_the_key(extra: str, path: str) -> None:
    """Bad worker/retention values name their key."""
    with pytest.raises(errors.ConfigError) as info:
        load_config(GOOD + extra + "\n", ENV)
    assert info.value.path == path


@pytest.mark.parametrize("url", [
    "sqlite:///var/puller.db", "sqlite://", "sqlite+pysqlite:////tmp/a.db",
    "postgresql://postgres@127.0.0.1:5432/test", "postgresql+psycopg://u:p@h/db?sslmode=require",
    "mysql+pymysql://u@h/db", "postgres://u@h/db",
])
def test_the_store_dialect_is_read_as_sqlalchemy_reads_it(url: str) -> None:
    """dialect_of reads the store URL without SQLAlchemy (the fetch process is forked
    before SQLAlchemy is imported); it must name the dialect SQLAlchemy will use."""
    assert dialect_of(url) == sa.make_url(url).get_backend_name()


def test_yaml_is_read_by_libyaml_as_pyyaml_reads_it_and_errors_keep_pyyaml_words() -> None:
    """The config is parsed on libyaml (where PyYAML has it) into the same tree as PyYAML's
    own parser; text libyaml refuses is read again by PyYAML, whose message names the
    problem: a tab by name, a lone surrogate as a config error, not a crash."""
    assert _FAST_LOADER is getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    example = (Path(__file__).parents[2] / "config" / "puller.example.yaml").read_text()
    for text in (GOOD, example):
        assert _parse_yaml(text) == yaml.safe_load(text)
    with pytest.raises(errors.ConfigError, match=r"line 2: found character '\\t'"):
        load_config("store: x\n\t- b\n", ENV)
    with pytest.raises(errors.ConfigError, match="not valid YAML"):
        load_config("store: \ud800\n", ENV)
