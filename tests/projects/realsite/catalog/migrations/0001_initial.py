import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Category",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100, unique=True)),
                ("slug", models.SlugField(unique=True)),
                ("description", models.TextField(blank=True)),
            ],
        ),
        migrations.CreateModel(
            name="Product",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=200)),
                ("sku", models.CharField(blank=True, max_length=40)),
                ("description", models.TextField(blank=True)),
                ("price", models.DecimalField(decimal_places=2, default=0, max_digits=10)),
                ("cost", models.DecimalField(decimal_places=2, default=0, max_digits=10)),
                ("stock", models.IntegerField(default=0)),
                ("reserved", models.IntegerField(default=0)),
                ("weight_grams", models.IntegerField(default=0)),
                ("width_mm", models.IntegerField(default=0)),
                ("height_mm", models.IntegerField(default=0)),
                ("depth_mm", models.IntegerField(default=0)),
                ("colour", models.CharField(blank=True, max_length=40)),
                ("material", models.CharField(blank=True, max_length=40)),
                ("is_active", models.BooleanField(default=True)),
                ("is_featured", models.BooleanField(default=False)),
                ("rating", models.FloatField(default=0)),
                ("reviews", models.IntegerField(default=0)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                ("category", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, to="catalog.category")),
            ],
            options={"ordering": ["name"]},
        ),
    ]
