"""``manage.py bench_login``: print the session cookie of a logged-in superuser ``bench``.

``bench/run.py`` sends it with every request to the admin change list, which (like every admin
page) reads the session and the user from the database before its own queries.
"""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.test import Client


class Command(BaseCommand):
    help = "Log in a superuser 'bench' and print its session cookie (NAME=VALUE)."

    def handle(self, *args, **options):
        user, created = get_user_model().objects.get_or_create(
            username="bench", defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            user.set_unusable_password()
            user.save()
        client = Client()
        client.force_login(user)
        self.stdout.write(f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}")
