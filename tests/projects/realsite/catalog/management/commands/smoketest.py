"""A management command that calls the site's own views with Django's test Client, inside a
transaction it opened itself (projects do this for smoke tests and data fixes)."""

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.test import Client

from catalog.models import Product


class Command(BaseCommand):
    help = "Create a product through the view inside a transaction, check it, roll it all back."

    def handle(self, *args, **options):
        client = Client()
        with transaction.atomic():
            Product.objects.create(name="command-made")
            response = client.post("/products/", {"name": "view-made"})
            if response.status_code != 200:
                raise CommandError(f"view answered {response.status_code}")
            names = sorted(Product.objects.values_list("name", flat=True))
            if names != ["command-made", "view-made"]:
                raise CommandError(f"rows inside the command's transaction: {names}")
            transaction.set_rollback(True)
        left = Product.objects.filter(name__in=["command-made", "view-made"]).count()
        if left:
            raise CommandError(f"{left} rows survived the command's rollback")
        self.stdout.write("smoketest ok")
