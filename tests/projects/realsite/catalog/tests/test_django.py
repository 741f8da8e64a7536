"""The same project's tests written with Django's TestCase and TransactionTestCase, as
`manage.py test` runs them (pytest-django runs them too)."""

from django.db import transaction
from django.test import TestCase, TransactionTestCase

from catalog.models import Category, Product


class CatalogViewTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.books, _ = Category.objects.get_or_create(slug="books", defaults={"name": "Books"})
        Product.objects.create(name="fixture", category=cls.books)

    def test_list_shows_the_fixture(self):
        self.assertEqual(self.client.get("/products/").json()["names"], ["fixture"])

    def test_create_through_the_view(self):
        response = self.client.post("/products/", {"name": "made"})
        self.assertEqual(response.status_code, 200)
        self.assertEqual(sorted(Product.objects.values_list("name", flat=True)), ["fixture", "made"])

    def test_views_writes_are_undone_between_tests(self):
        self.client.post("/products/", {"name": "made"})
        self.client.post("/products/", {"name": "made again"})
        self.assertEqual(Product.objects.count(), 3)

    def test_on_commit_hooks_of_the_view_are_captured(self):
        with self.captureOnCommitCallbacks(execute=True) as callbacks:
            transaction.on_commit(lambda: None)
            self.client.post("/products/", {"name": "hooked"})
        self.assertEqual(len(callbacks), 1)

    def test_an_async_view(self):
        response = self.client.post("/products/async/", {"name": "async"})
        self.assertEqual(response.json()["names"], ["async", "fixture"])


class SerializedCatalogTests(TransactionTestCase):
    serialized_rollback = True

    def test_create_through_the_view(self):
        Product.objects.create(name="before")
        self.assertEqual(self.client.post("/products/", {"name": "made"}).status_code, 200)
        self.assertEqual(sorted(Product.objects.values_list("name", flat=True)), ["before", "made"])

    def test_migration_rows_are_there_after_a_flush(self):
        self.assertEqual(Category.objects.count(), 3)
