"""``manage.py qcluster`` in a process whose pool already exists: the command queries first and
keeps its connection, as a command can, so the cluster's processes are forked from a process
with a pool and a borrowed connection. When the cluster has stopped, the command queries again
on the same session: the children must have left it alone."""

import multiprocessing
import time

from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connection


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


class Command(BaseCommand):
    help = "Query, run qcluster until it stops (SIGTERM), then query again on the same session."

    def handle(self, **options):
        before = backend_pid()
        self.stdout.write(f"parent session before: {before}", ending="\n")
        self.stdout.flush()
        call_command("qcluster")  # returns once the cluster runs; SIGTERM stops it
        while multiprocessing.active_children():
            time.sleep(0.1)
        try:
            after = backend_pid()
        except Exception as exc:
            self.stdout.write(f"parent session after: failed: {type(exc).__name__}: {exc}".replace("\n", " "))
        else:
            self.stdout.write(f"parent session after: {after}")
