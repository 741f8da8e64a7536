"""The table pool snapshots are published to (see :mod:`django_pooled_pg.publisher`).

Created UNLOGGED by the migration on PostgreSQL: the rows are rewritten every few seconds and
worthless after a crash, so they skip the write-ahead log (and replication). The model also
gives the app its ``view_poolsnapshot`` permission, which the admin page checks.
"""

from __future__ import annotations

from django.db import models


class PoolSnapshot(models.Model):
    """The latest snapshot of one alias's pool in one process (``data``: ``PoolSnapshot.to_dict()``)."""

    host = models.CharField(max_length=255)
    pid = models.IntegerField()
    alias = models.CharField(max_length=100)
    started_at = models.DateTimeField()
    #: The server's clock (``now()``) at publication; staleness is measured on it.
    published_at = models.DateTimeField()
    #: Seconds without a publication after which the publishing process counts as gone.
    stale_after = models.FloatField()
    data = models.JSONField()

    class Meta:
        db_table = "django_pooled_pg_poolsnapshot"
        default_permissions = ("view",)
        verbose_name = "pool snapshot"
        constraints = [
            models.UniqueConstraint(fields=["host", "pid", "alias"], name="django_pooled_pg_snapshot_key"),
        ]

    def __str__(self) -> str:
        return f"{self.alias} on {self.host}:{self.pid}"
