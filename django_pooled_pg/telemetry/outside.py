"""Connections of the statistics outside the pools: the publisher's when its pool cannot serve,
and those ``poolstats`` and the admin page read with (the pool may be the thing that is stuck)."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from django.db import connections

from .snapshot import hostname


def plain_connection_params(alias: str, application_name: str, connect_timeout: float | None = None) -> dict[str, Any]:
    """psycopg connection parameters of ``alias``'s database, for a connection outside its pool."""
    params = dict(connections[alias].get_connection_params())
    for key in ("cursor_factory", "context", "prepare_threshold", "server_side_binding"):
        params.pop(key, None)
    params["application_name"] = application_name
    params["autocommit"] = True
    if connect_timeout is not None:
        params["connect_timeout"] = max(2, int(connect_timeout + 0.999))
    return params


def connect(alias: str) -> Any:
    """A connection of its own to ``alias``'s database, for reading the statistics."""
    name = f"dpp-poolstats {hostname()}:{os.getpid()}"[:63]
    return psycopg.connect(**plain_connection_params(alias, name, connect_timeout=5))


def describe_error(exc: BaseException) -> str:
    """The first line of an error, for a report."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
