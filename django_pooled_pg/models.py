"""The table pool snapshots are published to (see :mod:`django_pooled_pg.telemetry.publisher`).

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
        # The admin's index lists it by this name; its changelist is the status page (admin.py).
        verbose_name_plural = "connection pools"
        constraints = [
            models.UniqueConstraint(fields=["host", "pid", "alias"], name="django_pooled_pg_snapshot_key"),
        ]

    def __str__(self) -> str:
        return f"{self.alias} on {self.host}:{self.pid}"


class PoolHistory(models.Model):
    """One point of one alias's pool in one process, for the admin page's chart of the last hour
    (written by the publisher, read by :mod:`django_pooled_pg.telemetry.history`, which explains why)."""

    #: The server's clock (``now()``) when the point was written.
    taken_at = models.DateTimeField()
    host = models.CharField(max_length=255)
    pid = models.IntegerField()
    alias = models.CharField(max_length=100)
    size = models.IntegerField()
    max_size = models.IntegerField()
    in_use = models.IntegerField()
    waiting = models.IntegerField()
    #: Borrows since the process's previous point, and their p95 wait in seconds.
    borrows = models.BigIntegerField()
    wait_p95 = models.FloatField()
    #: Seconds since the process's previous point: the time this point stands for.
    span = models.FloatField()

    class Meta:
        db_table = "django_pooled_pg_poolhistory"
        default_permissions = ()
        verbose_name = "pool history point"
        indexes = [models.Index(fields=["taken_at"], name="django_pooled_pg_hist_at")]

    def __str__(self) -> str:
        return f"{self.alias} on {self.host}:{self.pid} at {self.taken_at}"
