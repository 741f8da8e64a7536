"""Exceptions a borrower can see. Both subclass Django's ``OperationalError``, so code that
already catches database errors keeps working; the middleware turns them into HTTP 503."""

from __future__ import annotations

import contextvars

from django.db.utils import OperationalError


class PoolError(OperationalError):
    """No connection could be borrowed from the pool of ``alias``."""

    #: Seconds a client should wait before retrying (the ``Retry-After`` of the 503).
    retry_after = 1

    def __init__(self, message: str, *, alias: str, state: str = "") -> None:
        super().__init__(message)
        self.alias = alias
        #: The pool's state when it failed, for logs: size, idle, in use, waiting.
        self.state = state


class PoolExhausted(PoolError):
    """Every connection is in use and none came back within the pool's ``timeout``, or the
    queue of waiting borrowers is full (``max_waiting``)."""


class BudgetExhausted(PoolExhausted):
    """The fleet's connection budget (``OPTIONS["pool"]["fleet_max_size"]``) is used up by other
    processes: this one could not open a connection, and none of its own came free in time."""


class DatabaseUnavailable(PoolError):
    """The database cannot be reached: new connections fail, or the borrowed one was lost.
    ``__cause__`` holds the error from the server or the network."""

    retry_after = 5


#: The last PoolError raised in this thread or task, for the middleware: an inner middleware may
#: have turned it into a plain 500 response before the middleware saw the exception. Set by the
#: backend when a borrow fails or a connection is lost; the middleware clears it per request.
pool_error: contextvars.ContextVar[PoolError | None] = contextvars.ContextVar("pool_error", default=None)
