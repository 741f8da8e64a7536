"""Database features: Django's, plus the tests of Django's own suite that assert stock behaviour
this backend changes on purpose (see ``make django-suite`` and the README)."""

from __future__ import annotations

from django.db.backends.postgresql import features as postgresql
from django.utils.functional import cached_property


class DatabaseFeatures(postgresql.DatabaseFeatures):
    @cached_property
    def django_test_skips(self) -> dict[str, set[str]]:
        skips = super().django_test_skips
        if self.connection.settings_dict["OPTIONS"].get("pool") is False:
            return skips
        skips = {**skips}
        skips.setdefault("Pool does implicit health checks", set()).update({
            "backends.base.test_base.ConnectionHealthChecksTests.test_health_checks_enabled",
            "backends.base.test_base.ConnectionHealthChecksTests."
            "test_set_autocommit_health_checks_enabled",
        })
        return skips
