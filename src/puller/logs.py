"""The one place structlog is configured; JSON off a terminal, context from contextvars."""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from puller.imports import import_without

# structlog's import takes rich's traceback and pretty-printer (with pygments) when rich is
# installed: 70 ms against 38 ms without, before a pull can start. puller has no use for
# them: format_exc_info (below) makes an exception plain text before a renderer sees it.
import_without("structlog", absent="rich")

import structlog  # noqa: E402 - after the import above

_SECRET_KEYS = frozenset({"authorization", "headers", "password", "token", "api_key", "secret"})


def _redact(_: Any, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    # Defence in depth: no call site logs headers, but a future one must not leak them.
    for key in event.keys() & _SECRET_KEYS:
        event[key] = "[redacted]"
    return event


_settings: dict[str, Any] = {"json": None, "level": "info"}


def settings() -> dict[str, Any]:
    """What `configure` was last given, resolved (for a process started afresh)."""
    return dict(_settings)


def configure(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure logging once at start-up: JSON lines when `stream` is not a terminal."""
    out = stream or sys.stderr
    as_json = not out.isatty() if json is None else json
    _settings.update(json=as_json, level=level)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger() -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("puller")
    return logger


def debug_enabled() -> bool:
    """Whether a debug event would be written: to skip work done only for one."""
    return get_logger().is_enabled_for(logging.DEBUG)


def bound(**context: Any) -> _Bound:
    """Bind fixed keys (`tenant`, `scope`, `run_id`, `page`) for everything logged inside;
    on leaving, each key is as it was before (unbound, or its outer value)."""
    return _Bound(context)


class _Bound:
    """bound's context manager: the keys set as contextvars, and reset by their tokens.
    structlog's bound_contextvars reads every contextvar of the context first, to restore
    them by value: 13-16 us a use against 2.3 us so, and a page is bound three times in the
    fetch process (the page's request, its meta, its validation) and once where it is
    applied."""

    __slots__ = ("_context", "_tokens")

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context
        self._tokens: Mapping[str, contextvars.Token[Any]] = {}

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._context)

    def __exit__(self, *_: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)
