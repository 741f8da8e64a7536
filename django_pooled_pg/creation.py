"""Test databases: Django's, plus closing every pool on a database before it is dropped or
cloned. Django closes the pool of the alias it is working on; a mirror alias (``TEST["MIRROR"]``,
a read replica in tests) has a pool of its own on the same database."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import creation as postgresql

from .pooling.registry import registry


class DatabaseCreation(postgresql.DatabaseCreation):
    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> None:
        registry.close_database(self.connection.settings_dict["NAME"])
        super()._clone_test_db(suffix, verbosity, keepdb)

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        registry.close_database(test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)
