"""Rows made by a data migration: what serialized_rollback must bring back after a flush."""

from django.db import migrations

CATEGORIES = [("Books", "books"), ("Games", "games"), ("Tools", "tools")]


def create(apps, schema_editor):
    Category = apps.get_model("catalog", "Category")
    for name, slug in CATEGORIES:
        Category.objects.create(name=name, slug=slug)


class Migration(migrations.Migration):
    dependencies = [("catalog", "0001_initial")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
