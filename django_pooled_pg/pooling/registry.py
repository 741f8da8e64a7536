"""The process-wide pools: the only place a pool is created, looked up and closed.

One :class:`psycopg_pool.ConnectionPool` per database alias per process, shared by every thread.
A pool remembers the settings it was built from (its *fingerprint*); when the settings of its
alias change (the test runner switching ``NAME`` to the test database, ``override_settings`` on
``TIME_ZONE``) the next borrow retires the old pool and builds a new one, so a pool never keeps
pointing at the database it was first made for.

Fork safety: a child process inherits the parent's pools, their sockets and connections that
were borrowed at the time of the fork. Closing any of them in the child would send a terminate
message down a socket the parent still uses. So :func:`os.register_at_fork` makes the child
forget every inherited pool and borrowed connection without closing them (and keeps the objects
alive so no finaliser runs); the child builds its own pools on first use.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import Pool

logger = logging.getLogger("django_pooled_pg")


@dataclass
class PoolEntry:
    alias: str
    fingerprint: Any
    pool: Pool
    pid: int = field(default_factory=os.getpid)


class PoolRegistry:
    """Pools of this process, by alias."""

    def __init__(self) -> None:
        self._entries: dict[str, PoolEntry] = {}
        self._lock = threading.Lock()
        #: Bumped in a forked child; a connection borrowed under another generation belongs to
        #: the parent and must be dropped, not returned.
        self.generation = 0
        #: Pools and connections inherited over fork. Kept referenced so their finalisers never
        #: run in the child.
        self._inherited: list[Any] = []
        #: Called with the alias after a pool is made. The layers above hook in here (the
        #: ENGINE starts the statistics publisher with the first pool); the core imports none.
        self.pool_created: list[Callable[[str], None]] = []
        #: Called in a forked child once :attr:`generation` is the child's, in the order added:
        #: what must drop the parent's borrows by their generation hooks in here (the ENGINE's
        #: connection objects), not into a fork handler of its own whose turn would depend on
        #: the order the modules were imported in.
        self.forked: list[Callable[[], None]] = []

    def pool_for(self, alias: str, fingerprint: Any, build: Callable[[], Pool]) -> Pool:
        """The open pool of ``alias`` for settings ``fingerprint``, built by ``build()`` if needed."""
        pool = self.current(alias, fingerprint)
        if pool is not None:
            return pool
        with self._lock:
            entry = self._entries.get(alias)
            created = entry is None or entry.fingerprint != fingerprint or entry.pool.closed
            if created:
                pool = build()  # may raise ImproperlyConfigured: leave the old pool alone then
                if entry is not None:
                    logger.info("settings of database %r changed: replacing its pool", alias)
                    self._close_entry(entry)
                pool.open(wait=False)
                # A copy: the settings dicts may be edited in place later (tests do).
                self._entries[alias] = PoolEntry(alias, copy.deepcopy(fingerprint), pool)
            pool = self._entries[alias].pool
        if created:
            for hook in self.pool_created:
                hook(alias)
        return pool

    def current(self, alias: str, fingerprint: Any) -> Pool | None:
        """The open pool of ``alias`` if it was made for settings ``fingerprint``; None if not
        (then :meth:`pool_for` builds one). Every borrow asks, without the lock."""
        entry = self._entries.get(alias)
        if entry is not None and entry.fingerprint == fingerprint and not entry.pool.closed:
            return entry.pool
        return None

    def get(self, alias: str) -> Pool | None:
        """The pool of ``alias`` if this process has one."""
        entry = self._entries.get(alias)
        return entry.pool if entry is not None else None

    def pools(self) -> dict[str, Pool]:
        return {alias: entry.pool for alias, entry in self._entries.items()}

    def close(self, alias: str) -> None:
        """Close the pool of ``alias``; connections borrowed from it are closed when returned."""
        with self._lock:
            entry = self._entries.pop(alias, None)
            if entry is not None:
                self._close_entry(entry)

    def close_database(self, name: str) -> None:
        """Close every pool connected to database ``name`` (a test database and its mirrors,
        before it is dropped or used as a template)."""
        with self._lock:
            for alias, entry in list(self._entries.items()):
                if entry.fingerprint[0] == name:
                    del self._entries[alias]
                    self._close_entry(entry)

    def close_all(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
            for entry in entries:
                self._close_entry(entry)

    def _close_entry(self, entry: PoolEntry) -> None:
        if entry.pid != os.getpid():  # inherited: never touch the parent's sockets
            self._inherited.append(entry)
            return
        try:
            entry.pool.close(timeout=1.0)
        except Exception:  # closing must not fail the caller, e.g. at interpreter exit
            logger.warning("error closing the pool of %r", entry.alias, exc_info=True)

    def after_fork_in_child(self) -> None:
        """Forget, without closing, everything inherited from the parent process."""
        self._inherited.extend(self._entries.values())
        self._entries = {}
        self._lock = threading.Lock()
        self.generation += 1
        for hook in self.forked:
            hook()
        # (The ledger, the statistics and the telemetry forget theirs in fork handlers of their
        # own, which need no generation: any order does.)


registry = PoolRegistry()
os.register_at_fork(after_in_child=registry.after_fork_in_child)
atexit.register(registry.close_all)
