from django.db import models
from django.utils import timezone


class Customer(models.Model):
    name = models.CharField(max_length=100)
    email = models.EmailField(unique=True)

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"


class Product(models.Model):
    name = models.CharField(max_length=100)
    sku = models.CharField(max_length=32, unique=True)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class Order(models.Model):
    class Status(models.TextChoices):
        NEW = "new", "New"
        PAID = "paid", "Paid"
        SHIPPED = "shipped", "Shipped"

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="orders")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.NEW)

    def __str__(self) -> str:
        return f"Order #{self.pk} ({self.status})"


class OrderLine(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="lines")
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="order_lines")
    quantity = models.PositiveIntegerField()
    price = models.DecimalField(max_digits=10, decimal_places=2, help_text="Unit price when ordered")

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product_id}"


class Listing(models.Model):
    """A marketplace listing: a row as wide as real catalogue tables (30 columns, two foreign
    keys), for the benchmark's ORM list and admin change list (``bench/run.py``)."""

    class Condition(models.TextChoices):
        NEW = "new", "New"
        USED = "used", "Used"
        REFURBISHED = "refurbished", "Refurbished"

    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="listings")
    seller = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="listings")
    title = models.CharField(max_length=200)
    subtitle = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    condition = models.CharField(max_length=12, choices=Condition.choices, default=Condition.NEW)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    shipping_price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    currency = models.CharField(max_length=3, default="EUR")
    quantity = models.PositiveIntegerField(default=1)
    sold = models.PositiveIntegerField(default=0)
    views = models.PositiveIntegerField(default=0)
    watchers = models.PositiveIntegerField(default=0)
    weight_grams = models.PositiveIntegerField(default=0)
    width_mm = models.PositiveIntegerField(default=0)
    height_mm = models.PositiveIntegerField(default=0)
    depth_mm = models.PositiveIntegerField(default=0)
    color = models.CharField(max_length=30, blank=True)
    material = models.CharField(max_length=30, blank=True)
    brand = models.CharField(max_length=60, blank=True)
    ean = models.CharField(max_length=13, blank=True)
    location_city = models.CharField(max_length=60, blank=True)
    location_country = models.CharField(max_length=2, blank=True)
    is_active = models.BooleanField(default=True)
    is_featured = models.BooleanField(default=False)
    accepts_returns = models.BooleanField(default=True)
    rating = models.FloatField(default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(default=timezone.now)
    ends_on = models.DateField(null=True, blank=True)

    def __str__(self) -> str:
        return self.title
