import os

from django.db import connection
from django.test import TestCase, TransactionTestCase

from .apps import STARTED_ON
from .models import Note


def current_database():
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        return cursor.fetchone()[0]


class CheckDatabase:
    def check(self):
        assert STARTED_ON["database"] == os.environ["EARLY_DB"], STARTED_ON
        name = current_database()
        assert name.startswith("test_"), f"test queried {name!r}, not the test database"
        assert name == connection.settings_dict["NAME"]
        Note.objects.create(text="written in a test")
        assert Note.objects.count() == 1
        print(f"CHECKED pid={os.getpid()} db={name}", flush=True)


class FirstTests(CheckDatabase, TestCase):
    def test_database(self):
        self.check()


class SecondTests(CheckDatabase, TransactionTestCase):
    def test_database(self):
        self.check()


class ThirdTests(CheckDatabase, TestCase):
    def test_database(self):
        self.check()
