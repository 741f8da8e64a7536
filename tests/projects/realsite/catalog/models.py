"""An ordinary catalogue: a product row of some twenty columns and a foreign key, so the ORM's
statements are as long as a real project's (a select_related list query is ~1.3 KB of SQL)."""

from django.db import models


class Category(models.Model):
    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(unique=True)
    description = models.TextField(blank=True)


class Product(models.Model):
    category = models.ForeignKey(Category, null=True, blank=True, on_delete=models.SET_NULL)
    name = models.CharField(max_length=200)
    sku = models.CharField(max_length=40, blank=True)
    description = models.TextField(blank=True)
    price = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    cost = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    stock = models.IntegerField(default=0)
    reserved = models.IntegerField(default=0)
    weight_grams = models.IntegerField(default=0)
    width_mm = models.IntegerField(default=0)
    height_mm = models.IntegerField(default=0)
    depth_mm = models.IntegerField(default=0)
    colour = models.CharField(max_length=40, blank=True)
    material = models.CharField(max_length=40, blank=True)
    is_active = models.BooleanField(default=True)
    is_featured = models.BooleanField(default=False)
    rating = models.FloatField(default=0)
    reviews = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
