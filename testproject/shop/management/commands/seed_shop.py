"""``manage.py seed_shop``: demo data (200 products, 50 customers, 100 orders, 500 listings),
idempotent.

Running it again adds only what is missing, so the counts stay put.
"""

import random
from datetime import timedelta
from decimal import Decimal

from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from shop.models import Customer, Listing, Order, OrderLine, Product

WORDS = (
    "red green blue black white small large steel wooden paper glass linen "
    "mug lamp chair table notebook pen kettle bottle basket towel candle clock"
).split()


def product_sku(n: int) -> str:
    return f"SKU-{n:05d}"


def customer_email(n: int) -> str:
    return f"customer{n}@example.com"


class Command(BaseCommand):
    help = "Create demo products, customers and orders (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--products", type=int, default=200)
        parser.add_argument("--customers", type=int, default=50)
        parser.add_argument("--orders", type=int, default=100)
        parser.add_argument("--listings", type=int, default=500)

    @transaction.atomic
    def handle(self, *args, products: int, customers: int, orders: int, listings: int, **options):
        rng = random.Random(42)  # the same data on every machine
        Product.objects.bulk_create(
            [
                Product(
                    sku=product_sku(n),
                    name=f"{rng.choice(WORDS).title()} {rng.choice(WORDS)} {n}",
                    price=Decimal(rng.randint(199, 19999)) / 100,
                    stock=rng.randint(500, 2000),
                )
                for n in range(1, products + 1)
            ],
            ignore_conflicts=True,
        )
        Customer.objects.bulk_create(
            [Customer(name=f"Customer {n}", email=customer_email(n)) for n in range(1, customers + 1)],
            ignore_conflicts=True,
        )

        missing = orders - Order.objects.count()
        if missing > 0:
            all_products = list(Product.objects.order_by("pk")[:products])
            all_customers = list(Customer.objects.order_by("pk")[:customers])
            now = timezone.now()
            new_orders = Order.objects.bulk_create(
                [
                    Order(
                        customer=rng.choice(all_customers),
                        created_at=now - timedelta(minutes=rng.randint(0, 60 * 24 * 30)),
                        status=rng.choice(Order.Status.values),
                    )
                    for _ in range(missing)
                ]
            )
            lines = []
            for order in new_orders:
                for product in rng.sample(all_products, rng.randint(1, 4)):
                    lines.append(
                        OrderLine(order=order, product=product, quantity=rng.randint(1, 5), price=product.price)
                    )
            OrderLine.objects.bulk_create(lines)

        missing = listings - Listing.objects.count()
        if missing > 0:
            self.add_listings(
                rng,
                missing,
                list(Product.objects.order_by("pk")[:products]),
                list(Customer.objects.order_by("pk")[:customers]),
            )

        self.stdout.write(
            f"shop: {Product.objects.count()} products, {Customer.objects.count()} customers, "
            f"{Order.objects.count()} orders, {OrderLine.objects.count()} order lines, "
            f"{Listing.objects.count()} listings"
        )

    def add_listings(self, rng: random.Random, n: int, products: list, customers: list) -> None:
        now = timezone.now()
        Listing.objects.bulk_create(
            [
                Listing(
                    product=(product := rng.choice(products)),
                    seller=rng.choice(customers),
                    title=f"{product.name}, {rng.choice(WORDS)} edition",
                    subtitle=f"{rng.choice(WORDS).title()} and {rng.choice(WORDS)}",
                    description=" ".join(rng.choice(WORDS) for _ in range(40)),
                    condition=rng.choice(Listing.Condition.values),
                    price=product.price,
                    shipping_price=Decimal(rng.randint(0, 999)) / 100,
                    quantity=rng.randint(1, 50),
                    sold=rng.randint(0, 200),
                    views=rng.randint(0, 10000),
                    watchers=rng.randint(0, 300),
                    weight_grams=rng.randint(50, 5000),
                    width_mm=rng.randint(10, 900),
                    height_mm=rng.randint(10, 900),
                    depth_mm=rng.randint(10, 900),
                    color=rng.choice(WORDS[:5]),
                    material=rng.choice(("steel", "wood", "paper", "glass", "linen")),
                    brand=f"Brand {rng.randint(1, 40)}",
                    ean=f"{rng.randint(0, 10**13 - 1):013d}",
                    location_city=rng.choice(("Lyon", "Porto", "Graz", "Turku", "Gent")),
                    location_country=rng.choice(("FR", "PT", "AT", "FI", "BE")),
                    is_featured=rng.random() < 0.1,
                    accepts_returns=rng.random() < 0.8,
                    rating=round(rng.uniform(1, 5), 2),
                    created_at=now - timedelta(minutes=rng.randint(0, 60 * 24 * 90)),
                    ends_on=(now + timedelta(days=rng.randint(1, 60))).date(),
                )
                for _ in range(n)
            ]
        )
