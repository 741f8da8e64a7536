"""Free TCP ports on the loopback address, for the servers the tests, the demo and the benchmark
start (PostgreSQL, PgBouncer, gunicorn, uvicorn)."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it can be bound on 127.0.0.1 right now, else a kernel-chosen free port."""
    with socket.socket() as s:
        try:
            s.bind((HOST, preferred))
        except OSError:
            s.bind((HOST, 0))
        return int(s.getsockname()[1])
