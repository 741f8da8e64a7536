"""Warnings about events that can repeat thousands of times a minute, logged without a flood.

A thread that ends holding a connection, a transaction left open, a 503, a leak: each is worth a
WARNING the first time, with its details, and a count after that. A view that ran its queries in
a fresh thread per request made 75,000 identical lines a minute. So per kind of event, view and
alias, :func:`warn` logs the first occurrence in full, counts the ones after it, and logs one
summary line with the count at most every :data:`SUMMARY_INTERVAL` seconds (when the next one
comes, or when :func:`flush` runs: the statistics publisher calls it). The counters in
``ledger.stats_for(alias)`` and the signals are not affected: they count every event.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

logger = logging.getLogger("django_pooled_pg")

#: Seconds between two summary lines of one kind of event, view and alias.
SUMMARY_INTERVAL = 60.0
#: Distinct (kind, view, alias) keys remembered; beyond, views share the key "other views" (a
#: view name can be a request path, and paths are unbounded).
MAX_KEYS = 1000

_lock = threading.Lock()
#: (kind, alias, view) -> [occurrences not logged yet, when the last line was logged]
_seen: dict[tuple[str, str, str | None], list[Any]] = {}


def warn(kind: str, alias: str, view: str | None, message: str, *args: Any) -> None:
    """Log ``message % args`` at WARNING if it is the first ``kind`` event for this view and
    alias; otherwise count it, and log a summary if the last line is SUMMARY_INTERVAL old."""
    now = time.monotonic()
    with _lock:
        key = (kind, alias, view)
        entry = _seen.get(key)
        if entry is None and len(_seen) >= MAX_KEYS:
            key = (kind, alias, "other views")
            entry = _seen.get(key)
        if entry is None:
            _seen[key] = [0, now]
            summary = None
        else:
            entry[0] += 1
            summary = _take_due(key, entry, now)
    if summary is None and entry is None:
        logger.warning(
            message + " (more like it for this view and database are counted, and summed up every %gs)",
            *args,
            SUMMARY_INTERVAL,
        )
    elif summary is not None:
        _log_summary(*summary)


def flush(now: float | None = None) -> int:
    """Log the summaries that are due; how many lines."""
    now = time.monotonic() if now is None else now
    with _lock:
        due = [s for key, entry in _seen.items() if (s := _take_due(key, entry, now)) is not None]
    for summary in due:
        _log_summary(*summary)
    return len(due)


def reset() -> None:
    """Forget every event (tests)."""
    with _lock:
        _seen.clear()


def _after_fork_in_child() -> None:
    # A lock held by another thread of the parent at fork time would never be released here.
    global _lock
    _lock = threading.Lock()
    _seen.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _take_due(key: tuple[str, str, str | None], entry: list[Any], now: float) -> tuple[Any, ...] | None:
    count, logged_at = entry
    if not count or now - logged_at < SUMMARY_INTERVAL:
        return None
    entry[0], entry[1] = 0, now
    return (*key, count, now - logged_at)


def _log_summary(kind: str, alias: str, view: str | None, count: int, seconds: float) -> None:
    logger.warning(
        "%s: %d more time(s) in the last %.0fs%s on database %r (counted in poolstats)",
        kind,
        count,
        seconds,
        f" in view {view}" if view else "",
        alias,
    )
