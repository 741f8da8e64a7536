"""APM tools that time Django's ``connect()``: the wait for a pool connection is theirs to see.

sentry-sdk's Django integration (and other tools like it) replaces
``BaseDatabaseWrapper.connect`` with a wrapper that opens a "connect" span around Django's own
method. Our ``DatabaseWrapper.connect`` overrides it, so without help the tool never sees a borrow,
and the time a request waited for a pooled connection (the number an operator is after when a
pool saturates) shows nowhere.

So when such a wrapper is in place, a borrow goes through it: the wrapper calls Django's
``connect()``, whose steps are ours to fill in (``get_new_connection`` borrows,
``init_connection_state`` sets up the borrow), and the span covers the wait. Django's method
ends by sending ``connection_created``, which a pooled session got once, when it was opened;
receivers must not run again per borrow (their ``SET``\\ s would be sent, and reset, each time).
:class:`QuietConnectionCreated` stands in for the signal in that one module and leaves it
unsent for a borrow. Without an APM wrapper none of this runs: the borrow path stays our own.
"""

from __future__ import annotations

import sys
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils.asyncio import async_unsafe

#: The code of Django's ``async_unsafe`` wrapper, which Django's own ``connect`` is.
_ASYNC_UNSAFE_CODE = async_unsafe(lambda: None).__code__

#: (the ``connect`` seen last, whether it is an APM tool's wrapper): checked once per change.
_seen: tuple[Any, bool] = (None, False)


def connect_is_wrapped() -> bool:
    """True when something other than Django has replaced ``BaseDatabaseWrapper.connect``."""
    global _seen
    connect = BaseDatabaseWrapper.connect
    if _seen[0] is not connect:
        inner = getattr(connect, "__wrapped__", None)
        djangos = (
            getattr(connect, "__code__", None) is _ASYNC_UNSAFE_CODE
            and getattr(inner, "__qualname__", None) == "BaseDatabaseWrapper.connect"
        )
        _seen = (connect, not djangos)
    return _seen[1]


class QuietConnectionCreated:
    """``connection_created`` as Django's ``BaseDatabaseWrapper.connect`` sees it: sent as ever,
    except for a borrow made through an APM wrapper (the session got it when it was opened)."""

    def __init__(self, signal: Any) -> None:
        self.signal = signal

    def send(self, sender: Any, **named: Any) -> list[Any]:
        if getattr(named.get("connection"), "_connecting_through_apm", False):
            return []
        return self.signal.send(sender, **named)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.signal, name)


def _quiet_signal() -> None:
    module: Any = sys.modules[BaseDatabaseWrapper.__module__]
    if not isinstance(module.connection_created, QuietConnectionCreated):
        module.connection_created = QuietConnectionCreated(module.connection_created)


def connect_through_wrapper(wrapper: Any) -> None:
    """Borrow through the APM tool's ``connect`` wrapper (see the module docstring)."""
    _quiet_signal()
    wrapper._connecting_through_apm = True
    try:
        BaseDatabaseWrapper.connect(wrapper)
    finally:
        wrapper._connecting_through_apm = False
