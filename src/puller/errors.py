"""Every error puller raises, each composing what happened and what to do.

The tree (marker mixins in brackets are what retry and the CLI check; no code matches on text)::

    PullerError
    ├── ConfigError(path, problem, hint)                 [Terminal] -> exit 2
    ├── CallbackError(tenant, scope, page)
    │   ├── TransientCallbackError(reason, retry_after_s) [Transient] connect/timeout/5xx
    │   ├── FatalCallbackError(reason)                    [Terminal]  other 4xx, redirects
    │   ├── ForbiddenAddressError(host, address)          [Terminal]  SSRF guard refused
    │   ├── BrokenPageError(reason)                       [Terminal]  JSON/shape/size/loop/ceiling
    │   └── TenantReportedError(message)                  [Terminal]  status other than "success"
    ├── StoreError(problem)                               [Terminal]
    │   ├── SchemaError(current, needed)                  [Terminal]  run `puller db upgrade`
    │   └── StoreBusyError(problem)                       [Terminal]  another worker owns it
    └── AckError(reason)                                  reported, never rolls back stored data

A rejected record is data, not an exception: see ``domain.Rejection``.
Messages never carry URLs with query strings, header values or secrets.
"""

from __future__ import annotations

# The `puller` command's exit codes (README, "Exit codes", says what each covers).
EXIT_OK = 0
"""Done: for `pull`, every run succeeded; for `run`, the worker stopped cleanly."""
EXIT_FAILED = 1
"""A run failed or was skipped, the store failed or is behind, or it was interrupted."""
EXIT_USAGE = 2
"""The command line or the config is wrong (ConfigError): nothing was pulled."""


class Transient:
    """Marker: trying the same thing again later may succeed."""


class Terminal:
    """Marker: trying again without a change on someone's side will fail the same way."""


class PullerError(Exception):
    """puller failed; see the message for what happened and what to do."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(PullerError, Terminal):
    """The configuration is invalid; fix the named key and try again."""

    def __init__(self, *, path: str, problem: str, hint: str = "") -> None:
        self.path = path
        self.problem = problem
        self.hint = hint
        where = f"config {path}: " if path else "config: "
        tail = f" — {hint}" if hint else ""
        super().__init__(f"{where}{problem}{tail}")


class CallbackError(PullerError):
    """A tenant's callback failed for one page."""

    def __init__(self, *, tenant: str, scope: str, page: str, detail: str) -> None:
        self.tenant = tenant
        self.scope = scope
        self.page = page
        super().__init__(f"tenant {tenant}, scope {scope}, page {page}: {detail}")


class TransientCallbackError(CallbackError, Transient):
    """The callback failed in a way that may pass (connect error, timeout, 408/429/5xx)."""

    def __init__(
        self,
        *,
        tenant: str,
        scope: str,
        page: str,
        reason: str,
        retry_after_s: float | None = None,
        status: int | None = None,
        kind: str = "transport",
    ) -> None:
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status
        self.kind = kind  # "timeout" or "transport" when there is no HTTP status
        super().__init__(
            tenant=tenant,
            scope=scope,
            page=page,
            detail=f"{reason} — retried and still failing; the next run resumes at this "
            "page; if it persists, check the tenant's server",
        )


class FatalCallbackError(CallbackError, Terminal):
    """The callback refused the request (4xx other than 408/429, or a redirect)."""

    def __init__(
        self, *, tenant: str, scope: str, page: str, reason: str, status: int | None = None
    ) -> None:
        self.reason = reason
        self.status = status
        super().__init__(tenant=tenant, scope=scope, page=page, detail=reason)


class ForbiddenAddressError(CallbackError, Terminal):
    """The callback's host resolves to an address puller may not call."""

    def __init__(self, *, tenant: str, scope: str, page: str, host: str, address: str) -> None:
        self.host = host
        self.address = address
        super().__init__(
            tenant=tenant,
            scope=scope,
            page=page,
            detail=f"host {host!r} resolves to {address}, a loopback/private/link-local "
            "address — refused; if this tenant really lives on your own network, set "
            "allow_private_networks: true in the config",
        )


class BrokenPageError(CallbackError, Terminal):
    """The tenant served a page that breaks the callback protocol; nothing of it was applied."""

    def __init__(self, *, tenant: str, scope: str, page: str, reason: str) -> None:
        self.reason = reason
        super().__init__(tenant=tenant, scope=scope, page=page, detail=reason)


class TenantReportedError(CallbackError, Terminal):
    """The tenant answered with a status other than "success"; the page was not applied."""

    def __init__(self, *, tenant: str, scope: str, page: str, status: str, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(
            tenant=tenant,
            scope=scope,
            page=page,
            detail=f"tenant reported status {status!r}: {message or '(no message)'} — "
            "the page was not applied; ask the tenant to fix their export",
        )


class StoreError(PullerError, Terminal):
    """The store failed; nothing of the current page was applied."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"store: {problem}")


class SchemaError(StoreError):
    """The database schema is not the one this puller needs."""

    def __init__(self, *, current: str | None, needed: str) -> None:
        self.current = current
        self.needed = needed
        if current is None:
            problem = (f"the database has puller tables but no schema revision; this puller "
                       f"needs revision {needed} — it was not created by puller's migrations; "
                       "use a fresh database")
        else:
            problem = (f"the database schema is at revision {current}, this puller needs "
                       f"{needed} — back up the database, then run `puller db upgrade "
                       "--config PATH` (a newer schema needs a newer puller)")
        super().__init__(problem)


class StoreBusyError(StoreError):
    """Another puller worker already owns this store."""


class AckError(PullerError):
    """The delivery acknowledgement to commit_url failed; the stored data stays."""

    def __init__(self, *, tenant: str, scope: str, page: str, reason: str) -> None:
        self.tenant = tenant
        self.scope = scope
        self.page = page
        self.reason = reason
        super().__init__(
            f"tenant {tenant}, scope {scope}, page {page}: acknowledgement failed: {reason} — "
            "the page is stored and stays stored; the tenant may resend those records, "
            "which newest-wins makes harmless"
        )


class FetchProcessError(PullerError):
    """A sweep's fetching failed in the fetch process (`pull --fetch-process`): the message
    is the failure's own, as a pull without the option would report it."""
