from django.db import migrations, models


def items(apps, schema_editor):
    Item = apps.get_model("jobs", "Item")
    Item.objects.bulk_create(Item(name=f"item {n}") for n in range(10))


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Item",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100)),
            ],
        ),
        migrations.CreateModel(
            name="Run",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("n", models.IntegerField()),
                ("kind", models.CharField(max_length=20)),
                ("worker", models.IntegerField()),
                ("backend", models.IntegerField()),
                ("application_name", models.CharField(max_length=100)),
                ("pool_name", models.CharField(blank=True, max_length=100)),
                ("held_before", models.BooleanField()),
            ],
        ),
        migrations.RunPython(items, migrations.RunPython.noop),
    ]
