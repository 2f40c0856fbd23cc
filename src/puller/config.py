"""Turns YAML text and an environment mapping into frozen, validated config models."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from puller import errors
from puller.domain import PaginationMode, Scope

STORE_URL_ENV = "PULLER_STORE_URL"
DEFAULT_STORE_URL = "sqlite:///var/puller.db"
DEFAULT_MAX_PAGES = 100_000
DEFAULT_MAX_PAGE_BYTES = 32 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_PREFETCH = 4
MAX_PREFETCH = 32

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e\t]*$")


def dialect_of(store_url: str) -> str:
    """The SQLAlchemy dialect name of a store URL ("sqlite", "postgresql"): its scheme up to
    any "+driver", as SQLAlchemy's URL.get_backend_name() reads it, without importing
    SQLAlchemy (the fetch process needs it before the main process imports SQLAlchemy)."""
    return store_url.partition(":")[0].partition("+")[0]


def parse_duration_s(value: object) -> float:
    """Read `30s`, `15m`, `2h`, `1d` or a bare number of seconds into float seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number with a unit, such as 30s, 15m, 2h or 1d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(
                f"{value!r} is not a duration; write a number with a unit: s, m, h or d "
                "(e.g. 30s, 15m)"
            )
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return seconds


DurationS = Annotated[float, BeforeValidator(parse_duration_s)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class RetryConfig(_Frozen):
    """How often and how patiently a transient failure of one request is retried (SPEC §5)."""

    attempts: int = Field(default=5, ge=1, le=20)
    initial_wait_s: DurationS = Field(default=0.5, alias="initial_wait")
    max_wait_s: DurationS = Field(default=30.0, alias="max_wait")


class ScheduleConfig(_Frozen):
    """When the worker runs a callback: `{every: 15m}` or `{cron: "*/15 * * * *"}`."""

    every_s: DurationS | None = Field(default=None, alias="every")
    cron: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ScheduleConfig:
        if (self.every_s is None) == (self.cron is None):
            raise ValueError("give exactly one of `every` (e.g. 15m) or `cron` (5 fields)")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(
                f"cron {self.cron!r} needs 5 fields: minute hour day month weekday"
            )
        return self


def _check_url(value: str, *, key: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{key} must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{key} has no host")
    if parts.username or parts.password:
        raise ValueError(
            f"{key} must not carry credentials; put them in `headers` with ${{VAR}}"
        )
    return value


class CallbackConfig(_Frozen):
    """One scope's export endpoint of one tenant."""

    url: str
    pagination: PaginationMode = "page"
    page_size: int = Field(default=100, ge=1, le=10_000)
    schedule: ScheduleConfig | None = None
    commit_url: str | None = None
    max_pages: int = Field(default=DEFAULT_MAX_PAGES, ge=1)
    max_page_bytes: int = Field(default=DEFAULT_MAX_PAGE_BYTES, ge=1024)
    timeout_s: DurationS = Field(default=DEFAULT_TIMEOUT_S, alias="timeout")
    prefetch: int | None = Field(default=None, ge=0, le=MAX_PREFETCH)
    parallel_pages: int = Field(default=1, ge=1, le=MAX_PREFETCH + 1)

    @model_validator(mode="after")
    def _parallel(self) -> CallbackConfig:
        if self.parallel_pages == 1:
            return self
        if self.pagination != "page":
            raise ValueError("parallel_pages needs pagination: page (a cursor is known only "
                             "from the page before it); remove parallel_pages")
        if self.commit_url is not None:
            raise ValueError("parallel_pages cannot be used with commit_url (each page is "
                             "acknowledged before the next is asked for); remove one")
        if self.prefetch is not None and self.prefetch < self.parallel_pages - 1:
            raise ValueError(f"parallel_pages={self.parallel_pages} needs prefetch of at "
                             f"least {self.parallel_pages - 1}, or no prefetch key")
        return self

    @property
    def effective_prefetch(self) -> int:
        """Pages fetched ahead of the one being stored: 4 (or parallel_pages - 1 if more),
        or 0 with a commit_url.

        A tenant exporting "queue style" may expect each page acknowledged before the next
        request, so prefetch is off with a commit_url unless set explicitly.
        """
        if self.prefetch is not None:
            return self.prefetch
        if self.commit_url:
            return 0
        return max(DEFAULT_PREFETCH, self.parallel_pages - 1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, key="url")

    @field_validator("commit_url")
    @classmethod
    def _commit_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, key="commit_url")


def _scope_keys(value: object) -> object:
    if not isinstance(value, Mapping):
        return value
    parsed: dict[Scope, object] = {}
    for key, callback in value.items():
        try:
            scope = Scope.parse(key)
        except errors.ConfigError as exc:
            raise ValueError(f"{exc.problem}; {exc.hint}") from None
        if scope in parsed:
            raise ValueError(f"scope {scope.value} is configured twice (by name and by id)")
        parsed[scope] = callback
    return parsed


class WorkerConfig(_Frozen):
    """The long-lived worker (`puller run`): limits, ports, shutdown, back-off."""

    max_concurrent_runs: int = Field(default=8, ge=1, le=1000)
    max_runs_per_tenant: int = Field(default=2, ge=1, le=100)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    shutdown_grace_s: DurationS = Field(default=30.0, alias="shutdown_grace")
    startup_jitter_s: float = Field(default=10.0, ge=0, alias="startup_jitter")
    failure_backoff_s: DurationS = Field(default=30.0, alias="failure_backoff")
    max_failure_backoff_s: DurationS = Field(default=3600.0, alias="max_failure_backoff")
    stuck_after_s: DurationS = Field(default=30.0, alias="stuck_after")
    maintenance_cron: str = "17 3 * * *"

    @field_validator("startup_jitter_s", mode="before")
    @classmethod
    def _jitter(cls, value: object) -> object:
        # Zero is a valid jitter (no spreading), unlike other durations.
        return 0.0 if value in (0, "0", "0s") else parse_duration_s(value)

    @field_validator("maintenance_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"cron {value!r} needs 5 fields: minute hour day month weekday")
        return value


class RetentionConfig(_Frozen):
    """How long soft-deleted and rejected records are kept before the daily purge."""

    soft_deleted_s: DurationS = Field(default=90 * 86400.0, alias="soft_deleted")
    rejected_s: DurationS = Field(default=30 * 86400.0, alias="rejected")
    runs_s: DurationS = Field(default=90 * 86400.0, alias="runs")


class TenantConfig(_Frozen):
    """A registered tenant: its shop, its headers (secrets from env) and one callback per scope."""

    id: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    shop: str = Field(min_length=1, max_length=255)
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    normalize_case: bool = False
    ca_bundle: str | None = Field(default=None, min_length=1)
    """A PEM file of CA certificates this tenant's TLS is verified against (pinning);
    verification itself can never be switched off."""
    callbacks: Annotated[dict[Scope, CallbackConfig], BeforeValidator(_scope_keys)] = Field(
        min_length=1
    )

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if not _HEADER_VALUE.match(secret.get_secret_value()):
                # The value is a secret: say what is wrong with it, never echo it.
                raise ValueError(
                    f"the value of header {name} must be printable ASCII without line "
                    "breaks; check the environment variable it comes from"
                )
        return value

    def header_values(self) -> dict[str, str]:
        """The real header values, for the HTTP client only."""
        return {name: secret.get_secret_value() for name, secret in self.headers.items()}


class PullerConfig(_Frozen):
    """The whole configuration file."""

    store: str = DEFAULT_STORE_URL
    allow_private_networks: bool = False
    retry: RetryConfig = Field(default_factory=RetryConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    tenants: list[TenantConfig] = Field(default_factory=list)

    @field_validator("tenants")
    @classmethod
    def _unique_ids(cls, value: list[TenantConfig]) -> list[TenantConfig]:
        seen: set[str] = set()
        for tenant in value:
            if tenant.id in seen:
                raise ValueError(f"tenant id {tenant.id!r} is used twice; ids must be unique")
            seen.add(tenant.id)
        return value

    def tenant(self, tenant_id: str) -> TenantConfig:
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        known = ", ".join(t.id for t in self.tenants) or "(none)"
        raise errors.ConfigError(
            path="tenants", problem=f"no tenant {tenant_id!r}", hint=f"configured: {known}"
        )


_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str) -> Any:
    """The YAML tree, read by PyYAML's safe loader on libyaml where PyYAML was built with
    it: a config of 100 tenants in 4 ms instead of 27 (the worker reads it at start and at
    each reload). Text that libyaml refuses is read again by PyYAML's own parser, whose
    error is raised: its messages say more (a tab is named as such), as before."""
    try:
        return yaml.load(text, Loader=_FAST_LOADER)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, UnicodeError):
        return yaml.safe_load(text)


def load_config(text: str, env: Mapping[str, str], *, source: str = "config") -> PullerConfig:
    """Parse YAML text, substitute `${VAR}` from `env`, validate, apply env overrides.

    Raises:
        errors.ConfigError: naming the key path, what is wrong and what to do.
    """
    try:
        tree = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise errors.ConfigError(
            path=where, problem=f"{problem}", hint=f"fix the YAML syntax in {source}"
        ) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise errors.ConfigError(
            path="(top)", problem="the file must be a mapping of keys", hint="see the example"
        )
    tree = _substitute(tree, env, path="")
    if env.get(STORE_URL_ENV):
        tree["store"] = env[STORE_URL_ENV]
    try:
        return PullerConfig.model_validate(tree)
    except ValidationError as exc:
        raise _config_error(exc) from None


def _substitute(node: Any, env: Mapping[str, str], *, path: str) -> Any:
    if isinstance(node, str):
        return _ENV_REF.sub(lambda m: _env_value(m.group(1), env, path=path), node)
    if isinstance(node, dict):
        return {k: _substitute(v, env, path=_join(path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, env, path=f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def _env_value(name: str, env: Mapping[str, str], *, path: str) -> str:
    if name not in env:
        raise errors.ConfigError(
            path=path,
            problem=f"environment variable {name} is not set",
            hint=f"export {name} before starting puller",
        )
    return env[name]


def _join(path: str, key: object) -> str:
    text = str(key)
    if not text or text != text.strip() or "." in text or "[" in text:
        text = repr(text)  # an empty, padded or dotted key must still be visible in the path
    return f"{path}.{text}" if path else text


def _config_error(exc: ValidationError) -> errors.ConfigError:
    problems = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against config/puller.example.yaml"
        problems.append((path, message))
    path, first = problems[0]
    rest = "; ".join(f"{p}: {m}" for p, m in problems[1:])
    return errors.ConfigError(
        path=path, problem=first + (f" (also {rest})" if rest else ""), hint=""
    )


__all__ = [
    "CallbackConfig",
    "PullerConfig",
    "RetentionConfig",
    "RetryConfig",
    "ScheduleConfig",
    "TenantConfig",
    "WorkerConfig",
    "load_config",
    "parse_duration_s",
]
