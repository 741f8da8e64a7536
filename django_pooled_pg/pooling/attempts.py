"""How the pool's attempts to open a connection went: what a borrower facing a failing server
needs to give up fast and say why (:class:`~.pool.Pool` reads it; the pool's connection class,
:func:`.connection.health_tracking`, writes it)."""

from __future__ import annotations

import time

from .stats import AliasStats


class ConnectionHealth:
    """The outcome of the pool's most recent attempts to open a connection."""

    def __init__(self, stats: AliasStats) -> None:
        self.stats = stats
        self.last_error: BaseException | None = None
        self.failed_at = 0.0
        self.succeeded_at = 0.0

    @property
    def failing(self) -> bool:
        """True while the latest connection attempt failed."""
        return self.failed_at > self.succeeded_at

    def failed(self, error: BaseException) -> None:
        self.last_error = error
        self.failed_at = time.monotonic()
        self.stats.failed += 1

    def succeeded(self, seconds: float) -> None:
        """A connection opened in ``seconds``: counted, and its time recorded (the one place of
        both; a connection is opened by psycopg_pool's worker or a probe, never by a borrower)."""
        self.succeeded_at = time.monotonic()
        self.stats.opened += 1
        self.stats.connect.record(seconds)
