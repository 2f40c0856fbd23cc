"""Value types shared by every layer: scopes, page requests, checkpoints, run statistics."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, Protocol

from puller import errors

Raw = dict[str, Any]
"""A record exactly as the tenant sent it (decoded JSON object)."""

PaginationMode = Literal["page", "cursor"]


class Scope(enum.StrEnum):
    """A kind of data a tenant exports; its value is the name, `id` the protocol number."""

    CUSTOMER = "customer"
    ORDER = "order"
    PRODUCT = "product"

    @property
    def id(self) -> int:
        return _SCOPE_IDS[self]

    @property
    def id_field(self) -> str:
        return f"{self.value}_id"

    @classmethod
    def parse(cls, value: object) -> Scope:
        """Accept a scope by name (`customer`) or id (`1`, as int or string)."""
        if isinstance(value, Scope):
            return value
        text = str(value).strip().lower()
        for scope in cls:
            if text in (scope.value, str(scope.id)):
                return scope
        choices = ", ".join(f"{s.value} ({s.id})" for s in cls)
        raise errors.ConfigError(
            path="scope", problem=f"unknown scope {value!r}", hint=f"valid scopes: {choices}"
        )


_SCOPE_IDS = {Scope.CUSTOMER: 1, Scope.ORDER: 2, Scope.PRODUCT: 3}


def import_waves(scopes: Iterable[Scope]) -> list[list[Scope]]:
    """Group scopes into waves run one after another: customer+product, then order (SPEC §4)."""
    wanted = set(scopes)
    first: list[Scope] = [s for s in (Scope.CUSTOMER, Scope.PRODUCT) if s in wanted]
    second = [Scope.ORDER] if Scope.ORDER in wanted else []
    return [wave for wave in (first, second) if wave]


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One page to ask for: `number` counts pages within the sweep (1-based)."""

    number: int
    page_size: int
    page: int | None = None
    cursor: str | None = None

    @property
    def label(self) -> str:
        """How messages name this page: its page number, or its sequence number and cursor."""
        if self.page is not None:
            return str(self.page)
        if self.cursor is None:
            return f"{self.number} (first cursor page)"
        return f"{self.number} (cursor {self.cursor[:40]!r})"


@dataclass(frozen=True, slots=True)
class Where:
    """Which page an error is about, for messages: tenant, scope and page label."""

    tenant: str
    scope: Scope
    page: str

    def broken(self, reason: str) -> errors.BrokenPageError:
        return errors.BrokenPageError(
            tenant=self.tenant, scope=self.scope.value, page=self.page, reason=reason
        )


@dataclass(frozen=True, slots=True)
class PageMeta:
    """The `meta` object of a response envelope."""

    has_next_page: bool
    cursor: str | None = None
    page: int | None = None
    page_size: int | None = None


class RecordsWithNul(list[Any]):
    """A page's records as parsed from a body that has a NUL character (`\\u0000`)
    somewhere: validation looks for it record by record (records.validate_page), since
    PostgreSQL cannot store it."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed response: tenant status, paging metadata, and the raw records."""

    meta: PageMeta
    data: list[Raw]
    status: str | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where the next run of a (tenant, scope) starts: the next page of the current sweep."""

    next_number: int = 1
    next_page: int | None = None
    next_cursor: str | None = None

    @property
    def is_fresh(self) -> bool:
        return self.next_number == 1


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that broke a rule: where it was, what it was, and every reason."""

    position: int
    raw: object
    reasons: tuple[str, ...]


class Accepted(NamedTuple):
    """A valid record, reduced to what the store needs.

    A NamedTuple, not a frozen dataclass: one is built per record on the hot path, and a
    frozen dataclass's __init__ (object.__setattr__ per field) cost ~1 µs of ~5 (issue #5).
    """

    record_id: str
    last_modified_at: datetime
    deleted_at: datetime | None
    columns: dict[str, Any]
    position: int


@dataclass(frozen=True, slots=True)
class StoreRows:
    """A page's accepted records in a store's own form, made where they were validated.

    `pull --fetch-process` makes them in the fetch process, so the main process, which
    applies the pages one after another, neither unpickles record objects nor builds rows
    (for a page of 500 customers 0.1 ms instead of 1.1; issue #5). Already newest per id
    (`duplicates` were dropped); the store adds the tenant, the run and the time it stores
    them, as parameters of the page's statement.
    """

    dialect: str
    """The SQLAlchemy dialect they were made for ("sqlite", "postgresql")."""
    payload: Any
    """sqlite: the rows' values in one flat list of text, row after row, each row the
    table's columns without tenant_id, run_id and stored_at (forms.sqlite_rows);
    postgresql: the JSON text of the records."""
    survivors: int
    duplicates: int

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled for the pipe from the fetch process: SQLite's values as one text joined
        by NUL, split again on arrival: a page of 500 customers (rows of tuples) took 0.15 ms
        to write and 0.20 ms to read, one joined text 0.11 and 0.17 ms (a slow spell). No
        value holds a NUL: a page whose body has one goes the long way (RecordsWithNul),
        where a record holding one is rejected; the store checks the count of values."""
        if self.dialect != "sqlite":
            return StoreRows, (self.dialect, self.payload, self.survivors, self.duplicates)
        return _sqlite_rows_from_text, (
            _VALUE_SEPARATOR.join(self.payload), self.survivors, self.duplicates)


_VALUE_SEPARATOR = "\x00"


def _sqlite_rows_from_text(text: str, survivors: int, duplicates: int) -> StoreRows:
    values = text.split(_VALUE_SEPARATOR) if text else []
    return StoreRows(dialect="sqlite", payload=values, survivors=survivors,
                     duplicates=duplicates)


@dataclass(frozen=True, slots=True)
class ValidatedPage:
    """The result of validating one page."""

    accepted: list[Accepted]
    rejections: list[Rejection]
    normalised: int = 0
    rows: StoreRows | None = None
    """The accepted records in the store's form instead; `accepted` is then empty."""

    @property
    def accepted_count(self) -> int:
        """How many records of the page were accepted (duplicates of an id included)."""
        if self.rows is None:
            return len(self.accepted)
        return self.rows.survivors + self.rows.duplicates


@dataclass(frozen=True, slots=True)
class PageOutcome:
    """What one applied page changed in the store."""

    applied: int
    stale: int
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """What puller tells a tenant's commit_url after a page is durably stored."""

    run_id: int
    request: PageRequest
    accepted: int
    rejected: int


@dataclass(slots=True)
class RunStats:
    """Counters of one run, updated page by page."""

    pages: int = 0
    accepted: int = 0
    rejected: int = 0
    stale: int = 0
    normalised: int = 0
    acks_failed: int = 0


RunStatus = Literal["running", "succeeded", "failed", "interrupted", "abandoned", "skipped"]
"""`skipped` is never stored: the run did not start (another process holds the lease)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """How one (tenant, scope) run ended."""

    run_id: int
    tenant: str
    scope: Scope
    status: RunStatus
    stats: RunStats = field(default_factory=RunStats)
    duration_s: float = 0.0
    error: str | None = None


class Clock(Protocol):
    """Time as a parameter: wall-clock for timestamps, monotonic for durations."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...
