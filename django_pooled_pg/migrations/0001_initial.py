"""The snapshot table, made UNLOGGED on PostgreSQL (left a plain table on other databases)."""

from django.db import migrations, models


def set_unlogged(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        table = schema_editor.quote_name(apps.get_model("django_pooled_pg", "PoolSnapshot")._meta.db_table)
        schema_editor.execute(f"ALTER TABLE {table} SET UNLOGGED")


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="PoolSnapshot",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("host", models.CharField(max_length=255)),
                ("pid", models.IntegerField()),
                ("alias", models.CharField(max_length=100)),
                ("started_at", models.DateTimeField()),
                ("published_at", models.DateTimeField()),
                ("stale_after", models.FloatField()),
                ("data", models.JSONField()),
            ],
            options={
                "verbose_name": "pool snapshot",
                "db_table": "django_pooled_pg_poolsnapshot",
                "default_permissions": ("view",),
                "constraints": [
                    models.UniqueConstraint(fields=("host", "pid", "alias"), name="django_pooled_pg_snapshot_key"),
                ],
            },
        ),
        # Dropping the table (reverse of CreateModel) needs nothing undone first.
        migrations.RunPython(set_unlogged, migrations.RunPython.noop, elidable=False),
    ]
