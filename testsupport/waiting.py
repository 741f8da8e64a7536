"""Waiting for a condition in tests, with a deadline, instead of sleeping for a guess.

A test never knows how busy the machine is: a sleep that was long enough on an idle laptop is
too short on a loaded 2-core CI runner. So a test that waits *for* something polls a predicate
with a short sleep until it holds or a generous deadline passes, then fails saying what it
waited for (a sleep that *holds* something for a while, a view keeping a connection so others
queue, stays a sleep).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Seconds a test waits for a condition by default: far more than any of them takes when the
#: machine is idle, so only a condition that never comes fails.
TIMEOUT = 30.0


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline (an AssertionError: pytest shows it as a
    failed assertion, with the message and the predicate's last value)."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float = TIMEOUT,
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value, and return
    that value; :class:`WaitTimeout` if ``timeout`` seconds pass first. ``message`` says what
    was awaited (a callable: computed at the timeout, e.g. to show the state found)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise WaitTimeout(
                f"timed out after {timeout:g} s waiting for {what or getattr(predicate, '__name__', 'a condition')}"
                f" (last value: {value!r})"
            )
        time.sleep(interval)
