"""The history table of the admin page's chart (UNLOGGED on PostgreSQL, as the snapshots), and
the snapshot model's admin name."""

from django.db import migrations, models


def set_unlogged(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        table = schema_editor.quote_name(apps.get_model("django_pooled_pg", "PoolHistory")._meta.db_table)
        schema_editor.execute(f"ALTER TABLE {table} SET UNLOGGED")


class Migration(migrations.Migration):
    dependencies = [("django_pooled_pg", "0001_initial")]

    operations = [
        migrations.AlterModelOptions(
            name="poolsnapshot",
            options={
                "default_permissions": ("view",),
                "verbose_name": "pool snapshot",
                "verbose_name_plural": "connection pools",
            },
        ),
        migrations.CreateModel(
            name="PoolHistory",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("taken_at", models.DateTimeField()),
                ("host", models.CharField(max_length=255)),
                ("pid", models.IntegerField()),
                ("alias", models.CharField(max_length=100)),
                ("size", models.IntegerField()),
                ("max_size", models.IntegerField()),
                ("in_use", models.IntegerField()),
                ("waiting", models.IntegerField()),
                ("borrows", models.BigIntegerField()),
                ("wait_p95", models.FloatField()),
                ("span", models.FloatField()),
            ],
            options={
                "verbose_name": "pool history point",
                "db_table": "django_pooled_pg_poolhistory",
                "default_permissions": (),
                "indexes": [models.Index(fields=["taken_at"], name="django_pooled_pg_hist_at")],
            },
        ),
        migrations.RunPython(set_unlogged, migrations.RunPython.noop, elidable=False),
    ]
