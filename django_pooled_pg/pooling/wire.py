"""Waiting on libpq with a deadline: libpq has no read timeout, so a round trip the pool makes
on its own (a ping, the answer of a reset) waits on the socket itself, and gives up in time on a
network that went silent. Only psycopg's public ``pq`` interface is used."""

from __future__ import annotations

import select
import time
from typing import Any

from psycopg.pq import ExecStatus


def wait_socket(fd: int, events: int, deadline: float) -> bool:
    """Wait until ``fd`` is ready for ``events``; False at ``deadline``."""
    poller = select.poll()
    poller.register(fd, events | select.POLLERR | select.POLLHUP)
    remaining = deadline - time.monotonic()
    return remaining > 0 and bool(poller.poll(remaining * 1000))


def send(pgconn: Any, query: bytes, deadline: float) -> None:
    """Send ``query`` (the simple protocol: several statements may travel in one string) without
    waiting for its answer; TimeoutError if the socket takes none of it by ``deadline``."""
    pgconn.send_query(query)
    while pgconn.flush():  # (non-blocking libpq: a short statement goes at once)
        if not wait_socket(pgconn.socket, select.POLLOUT, deadline):
            raise TimeoutError


def wait_answer(pgconn: Any, deadline: float) -> None:
    """Read input until the answer to the command in flight is complete; TimeoutError at
    ``deadline``."""
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            return
        if not wait_socket(pgconn.socket, select.POLLIN, deadline):
            raise TimeoutError


def read_results(pgconn: Any, deadline: float) -> list[ExecStatus]:
    """Wait until ``deadline`` for the answer to the command in flight and read it: the status of
    each of its results. TimeoutError if it did not come in time."""
    wait_answer(pgconn, deadline)
    statuses = []
    while (result := pgconn.get_result()) is not None:
        statuses.append(result.status)
    return statuses
