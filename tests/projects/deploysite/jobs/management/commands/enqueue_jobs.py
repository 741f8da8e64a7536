from django.core.management.base import BaseCommand
from django_q.tasks import async_task


class Command(BaseCommand):
    help = "Enqueue COUNT jobs.tasks.report tasks of KIND (plain or borrow), numbered from FIRST."

    def add_arguments(self, parser):
        parser.add_argument("count", type=int)
        parser.add_argument("kind", choices=["plain", "borrow"])
        parser.add_argument("--first", type=int, default=0)
        parser.add_argument("--hold", type=float, default=0.0)

    def handle(self, count, kind, first, hold, **options):
        for n in range(first, first + count):
            async_task("jobs.tasks.report", n, kind, hold)
