"""puller's HTTP client: fetch a page, acknowledge it, cap bodies, map errors; over
transport's guarded connections (httpx and aiohttp are used here and there only)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict
from urllib.parse import urlencode, urlsplit

from puller import errors, protocol, retry
from puller.config import CallbackConfig, RetryConfig, TenantConfig
from puller.domain import Ack, PageRequest, Scope
from puller.imports import import_without, import_without_ca_store

# httpx's import takes its command-line tool (click, rich, pygments: 38 ms) when click is
# installed (import-linter's dependency, in the dev extras). Where it is not, nothing changes.
import_without("httpx", absent="click")
# aiohttp's two default TLS contexts, which puller never uses, load no CA certificates: the
# fetch process was ready 0.21 -> 0.15 s after its fork (5 runs each, scripts/bench's server).
import_without_ca_store("aiohttp")

import aiohttp  # noqa: E402 - after the imports above
import httpx  # noqa: E402

from puller.page_requests import PageRequests  # noqa: E402 - imports httpx
from puller.transport import (  # noqa: E402 - imports aiohttp and httpx
    Body,
    GuardedTransport,
    RefusedAddress,
    Resolver,
    resolve,
)

USER_AGENT = "puller/0.1"
CONNECT_TIMEOUT_S = 10.0

Sleep = Callable[[float], Awaitable[None]]


class RequestObserver(Protocol):
    """Told about every failed request attempt and every retry (the worker's metrics)."""

    def request_failed(self, status: str) -> None: ...

    def request_retried(self) -> None: ...


class _Where(TypedDict):
    tenant: str
    scope: str
    page: str


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: a tenant's Set-Cookie is never stored, so never
    sent back to it or to a tenant sharing the client. It also skips httpx's cookie
    extraction, which py-spy put at ~8% of a pull's GIL time."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class HttpClient(httpx.AsyncClient):
    """httpx's AsyncClient without cookie state (the callback protocol has no cookies), and
    with its transport at hand: CallbackSource sends each request through `transport`
    itself (httpx's transport API), not through the client's send machinery."""

    _no_cookies = _NoCookies()

    def __init__(self, *, transport: GuardedTransport, headers: dict[str, str]) -> None:
        super().__init__(transport=transport, follow_redirects=False, trust_env=False,
                         headers=headers)
        self.transport = transport

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise AttributeError("puller's HTTP client keeps no cookies")


def build_http_client(
    *, allow_private_networks: bool, ca_bundle: str | None = None, resolver: Resolver = resolve,
    for_https: bool = True,
) -> HttpClient:
    """An AsyncClient whose every connection passes the address guard; redirects off.

    TLS certificates are always verified, against `ca_bundle` when a tenant pins one.
    `for_https=False`, for tenants whose every URL is http://: the TLS context trusts no
    certificate instead of loading the system's CA certificates (16-40 ms of a pull's
    start-up here), so an https request through it would fail verification, never skip it.
    """
    if for_https:
        tls = ssl.create_default_context(cafile=ca_bundle)
    else:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, and trusts nothing
    transport = GuardedTransport(allow_private=allow_private_networks, tls=tls,
                                 resolver=resolver)
    return HttpClient(transport=transport, headers={"User-Agent": USER_AGENT})


class HttpClients:
    """One AsyncClient per CA bundle: the shared default, or a tenant's pinned CA; and one
    for tenants whose every URL is http://, which loads no CA certificate."""

    def __init__(self, *, allow_private_networks: bool) -> None:
        self._allow_private = allow_private_networks
        self._clients: dict[tuple[str | None, bool], HttpClient] = {}

    def for_tenant(self, tenant: TenantConfig) -> HttpClient:
        """The client for a tenant; an unreadable ca_bundle is a config error."""
        key = (tenant.ca_bundle, tenant.ca_bundle is not None or _uses_https(tenant))
        if key not in self._clients:
            try:
                self._clients[key] = build_http_client(
                    allow_private_networks=self._allow_private, ca_bundle=key[0],
                    for_https=key[1])
            except (OSError, ssl.SSLError) as exc:
                raise errors.ConfigError(
                    path=f"tenants[{tenant.id}].ca_bundle",
                    problem=f"cannot load {key[0]!r}: {exc}",
                    hint="give a readable PEM file of the CA certificates to trust",
                ) from None
        return self._clients[key]

    async def __aenter__(self) -> HttpClients:
        return self

    async def __aexit__(self, *_: object) -> None:
        for http in self._clients.values():
            await http.aclose()
        self._clients.clear()


def _uses_https(tenant: TenantConfig) -> bool:
    """Whether any callback or commit URL of the tenant is https:// (redirects are off, so
    an http:// URL never leads to one)."""
    urls = [u for c in tenant.callbacks.values() for u in (c.url, c.commit_url) if u]
    return any(urlsplit(url).scheme != "http" for url in urls)


class CallbackSource:
    """A PageSource for one (tenant, scope) over httpx, with retries."""

    def __init__(
        self,
        http: HttpClient,
        *,
        tenant: TenantConfig,
        scope: Scope,
        callback: CallbackConfig,
        policy: RetryConfig,
        sleep: Sleep = asyncio.sleep,
        observer: RequestObserver | None = None,
    ) -> None:
        self._transport = http.transport  # each request goes through it (_post_once)
        self._tenant = tenant
        self._scope = scope
        self._callback = callback
        self._policy = policy
        self._sleep = sleep
        self._observer = observer
        # What the client's send would add to each request: its default headers, overridden
        # case-insensitively by the tenant's, and the timeouts.
        self._headers = httpx.Headers(http.headers)
        self._headers.update({**tenant.header_values(), "Content-Type": "application/json"})
        self._extensions = {"timeout": httpx.Timeout(
            callback.timeout_s, connect=CONNECT_TIMEOUT_S).as_dict()}
        self._body = protocol.request_body(tenant.shop)
        self._page_request = PageRequests(callback.url, body=self._body, headers=self._headers,
                                          extensions=self._extensions)

    async def fetch_page(self, request: PageRequest) -> bytes:
        """The raw body of one page, retried on transient failures.

        Raises:
            errors.CallbackError: a subclass saying what failed and what to do.
        """
        query = urlencode(protocol.request_params(request))
        return await self._with_retries(lambda: self._post(
            self._page_request(query), page=request.label, cap=self._callback.max_page_bytes))

    async def acknowledge(self, ack: Ack) -> None:
        """POST the delivery acknowledgement to commit_url, retried; raises errors.AckError."""
        url = self._callback.commit_url
        if url is None:
            return
        body = protocol.ack_body(
            shop=self._tenant.shop, scope=self._scope, request=ack.request, run_id=ack.run_id,
            accepted=ack.accepted, rejected=ack.rejected,
        )
        try:
            await self._with_retries(lambda: self._post(
                httpx.Request("POST", url, content=body, headers=self._headers,
                              extensions=self._extensions),
                page=ack.request.label, cap=65_536))
        except errors.CallbackError as exc:
            raise errors.AckError(tenant=self._tenant.id, scope=self._scope.value,
                                  page=ack.request.label, reason=str(exc.args[0])) from exc

    async def _with_retries(self, post: Callable[[], Awaitable[bytes]]) -> bytes:
        """`post()`, retried by the policy on transient failures. The first attempt runs
        outside tenacity, which takes over once it failed transiently: it is given that
        failure as its own first attempt, so the attempts, waits and Retry-After are as if
        it had made it. Setting up and stepping tenacity for a request that succeeds cost
        ~45 µs of CPU, ~6% of the fetch process at page size 50."""
        try:
            return await post()
        except Exception as exc:
            if not isinstance(exc, errors.Transient):  # as tenacity's retry= decides
                raise
            failed: BaseException | None = exc
        async for attempt in self._retrying():
            with attempt:
                if failed is not None:
                    first, failed = failed, None
                    raise first
                return await post()
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _retrying(self) -> Any:
        observer = self._observer
        on_retry = None if observer is None else (lambda _exc, _delay: observer.request_retried())
        return retry.retrying(self._policy, sleep=self._sleep, on_retry=on_retry)

    async def _post(self, request: httpx.Request, *, page: str, cap: int) -> bytes:
        try:
            return await self._post_once(request, page=page, cap=cap)
        except errors.CallbackError as exc:
            if self._observer is not None:
                self._observer.request_failed(_status_label(exc))
            raise

    async def _post_once(self, request: httpx.Request, *, page: str, cap: int) -> bytes:
        where = _Where(tenant=self._tenant.id, scope=self._scope.value, page=page)
        try:
            # Straight through the transport, as AsyncClient.send would end up doing with
            # redirects off, no cookies and no auth: the client's machinery around it was
            # ~45 µs of CPU a request (a pull at page size 50: 1.66 -> 1.55 s, see README).
            response = await self._transport.handle_async_request(request)
            response.request = request
            try:
                _check_status(response, url=request.url, where=where)
                return await _read_capped(response, cap=cap, where=where)
            finally:
                await response.aclose()
        except RefusedAddress as exc:
            raise errors.ForbiddenAddressError(
                **where, host=exc.host, address=exc.address) from None
        except httpx.DecodingError as exc:
            raise errors.BrokenPageError(
                **where, reason=f"the body could not be decoded ({_short(exc)}); report it "
                "to the tenant") from None
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            # aiohttp.ClientError: what httpx-aiohttp leaves unmapped (a malformed response).
            raise _transport_error(exc, where=where, url=request.url) from None


def _transport_error(exc: Exception, *, where: _Where,
                     url: httpx.URL) -> errors.CallbackError:
    """What failed on the wire, named from aiohttp's own exception where there is one:
    httpx-aiohttp maps several (a refused or dropped connection) to ConnectTimeout."""
    untrusted = _certificate_problem(exc)
    if untrusted is not None:
        return errors.FatalCallbackError(
            **where, reason=f"the TLS certificate of {url.host} is not "
            f"trusted ({untrusted}) — fix the tenant's certificate, or pin the CA that "
            "signed it with ca_bundle in this tenant's config; verification is never "
            "switched off")
    path = _path(url)
    cause: BaseException = exc.__cause__ or exc
    if isinstance(cause, httpx.TransportError):  # no aiohttp underneath (respx in tests)
        timed_out = isinstance(cause, httpx.TimeoutException)
    else:
        timed_out = isinstance(cause, TimeoutError)  # aiohttp's timeouts subclass it
    name = type(cause).__name__
    if timed_out:
        return errors.TransientCallbackError(**where, reason=f"{name} on POST {path}",
                                             kind="timeout")
    return errors.TransientCallbackError(
        **where, reason=f"{name} on POST {path}: {_short(cause)}")


def _path(url: httpx.URL) -> str:
    """The URL's path as messages show it: never its query, which may hold a token."""
    return urlsplit(str(url)).path or "/"


def _status_label(exc: errors.CallbackError) -> str:
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return str(status)
    if isinstance(exc, errors.TransientCallbackError):
        return exc.kind
    if isinstance(exc, errors.ForbiddenAddressError):
        return "forbidden"
    return "broken"


def _check_status(response: httpx.Response, *, url: httpx.URL, where: _Where) -> None:
    verdict = retry.classify(response.status_code)
    if verdict == "ok":
        return
    path = _path(url)
    status = response.status_code
    if verdict == "transient":
        wait = retry.retry_after_s(response.headers.get("Retry-After"), datetime.now(UTC))
        raise errors.TransientCallbackError(
            **where, reason=f"HTTP {status} from POST {path}", retry_after_s=wait, status=status
        )
    if verdict == "redirect":
        target = urlsplit(response.headers.get("Location", "")).path or "?"
        raise errors.FatalCallbackError(
            **where, status=status,
            reason=f"HTTP {status} redirect from POST {path} to {target} — redirects are not "
            "followed; register the final URL in the config",
        )
    raise errors.FatalCallbackError(
        **where, status=status,
        reason=f"HTTP {status} from POST {path} — not retried; check the URL and the "
        "tenant's headers/credentials in the config",
    )


async def _read_capped(response: httpx.Response, *, cap: int, where: _Where) -> bytes:
    declared = response.headers.get("Content-Length")
    too_big = (
        f"response body exceeds max_page_bytes={cap} — lower page_size, or raise "
        "max_page_bytes if the tenant's pages really are this large"
    )
    if declared and declared.isdigit() and int(declared) > cap:
        raise errors.BrokenPageError(**where, reason=too_big)
    if isinstance(response.stream, Body) and "Content-Encoding" not in response.headers:
        body = await response.stream.read_capped(cap)
        if body is None:
            raise errors.BrokenPageError(**where, reason=too_big)
        return body
    chunks: list[bytes] = []
    total = 0
    # aiter_bytes yields decoded bytes, so a gzip bomb is stopped at the cap as it inflates.
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > cap:
            raise errors.BrokenPageError(**where, reason=too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def _certificate_problem(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    while seen is not None:
        # aiohttp's ClientConnectorCertificateError is one too, with the ssl one as cause.
        if isinstance(seen, ssl.SSLCertVerificationError) and hasattr(seen, "verify_message"):
            return str(seen.verify_message or seen.reason or "verification failed")
        seen = seen.__cause__ or seen.__context__
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no detail"
