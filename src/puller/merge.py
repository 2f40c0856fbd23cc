"""Newest-wins: which version of a record survives (SPEC §3); store.py's SQL must agree."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from puller.domain import Accepted


def is_newer(incoming: datetime, stored: datetime | None) -> bool:
    """A version replaces the stored one only when strictly newer; equal is stale."""
    return stored is None or incoming > stored


def newest_per_id(records: Iterable[Accepted]) -> tuple[list[Accepted], int]:
    """Keep one version per id within a page: the newest, the earliest on a tie.

    The earliest wins a tie because applying the page in order would skip a later equal
    version as stale. Returns the survivors in page order and how many were dropped.
    """
    best: dict[str, Accepted] = {}
    dropped = 0
    for record in records:
        kept = best.get(record.record_id)
        if kept is None:
            best[record.record_id] = record
            continue
        dropped += 1
        if is_newer(record.last_modified_at, kept.last_modified_at):
            best[record.record_id] = record
    survivors = sorted(best.values(), key=lambda r: r.position) if dropped else list(best.values())
    return survivors, dropped
