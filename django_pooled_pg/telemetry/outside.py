"""Connections of the statistics outside the pools: the publisher's when its pool cannot serve,
and those ``poolstats`` and the admin page read with (the pool may be the thing that is stuck)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from django.db import connections

from ..pooling.budget import BudgetRefused, FleetBudget
from ..pooling.registry import registry
from ..settings import read_pool_settings
from .snapshot import hostname

C = TypeVar("C")


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
    params = plain_connection_params(alias, name, connect_timeout=5)
    return within_budget(alias, params, lambda: psycopg.connect(**params), reader=True)


def within_budget(alias: str, params: dict[str, Any], connect: Callable[[], C], *, reader: bool = False) -> C:
    """``connect()``, let in by ``alias``'s fleet budget if it has one (this process's pool's,
    or one read from the settings in a process without a pool, such as ``poolstats``): the
    statistics' connections count like the pool's. A refusal is a ``psycopg.OperationalError``,
    which every reader of the statistics already reports."""
    try:
        size = read_pool_settings(alias, connections[alias].settings_dict).fleet_max_size
    except Exception:  # (settings the pool would refuse: no budget to honour)
        size = None
    if size is None:
        return connect()
    pool = registry.get(alias)
    budget = (
        pool.budget if pool is not None and pool.budget is not None else FleetBudget.for_params(alias, size, params)
    )
    try:
        return budget.connect(connect, reader=reader)
    except BudgetRefused as refused:
        raise psycopg.OperationalError(str(refused)) from None


def describe_error(exc: BaseException) -> str:
    """The first line of an error, for a report."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
