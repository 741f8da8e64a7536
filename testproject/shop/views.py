"""The demo's views: small, typical request shapes to watch the pool under (JSON unless noted)."""

from __future__ import annotations

import contextlib
import csv
import os
import random
import time
from decimal import Decimal

from django.db import transaction
from django.db.models import F
from django.forms.models import model_to_dict
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.utils.html import escape
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from .management.commands.seed_shop import customer_email, product_sku
from .models import Customer, Listing, Order, OrderLine, Product

# seed_shop's numbering; the views pick random rows by their unique keys, which costs one index
# lookup instead of ORDER BY random().
N_PRODUCTS = 200
N_CUSTOMERS = 50


def product_json(p: Product) -> dict:
    return {"id": p.pk, "sku": p.sku, "name": p.name, "price": str(p.price), "stock": p.stock}


def random_product() -> Product | None:
    return Product.objects.filter(sku=product_sku(random.randint(1, N_PRODUCTS))).first()


def no_data() -> JsonResponse:
    return JsonResponse({"error": "no data: run `manage.py seed_shop`"}, status=503)


def index(request: HttpRequest) -> HttpResponse:
    first = Product.objects.order_by("pk").values_list("pk", flat=True).first() or 1
    links = [
        (f"/shop/product/{first}/", "one product (single lookup)"),
        ("/shop/three/", "three quick queries"),
        ("/shop/slow/", "query, 50 ms call to another service, query"),
        ("/shop/order/", "create an order in a transaction (POST; GET works too)"),
        ("/shop/export.csv", "stream every product as CSV (QuerySet.iterator())"),
        ("/shop/async/", "async view using the ORM's async API"),
        ("/shop/listings/", "50 listings of 30 columns with their product and seller (select_related)"),
        ("/admin/", "the admin"),
        ("/admin/django_pooled_pg/poolsnapshot/", "the pool status page (every process, the server's view)"),
    ]
    items = "\n".join(
        f'<li><a href="{escape(url)}">{escape(url)}</a> &mdash; {escape(text)}</li>' for url, text in links
    )
    return HttpResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>django-pooled-pg demo shop</title></head>"
        "<body><h1>django-pooled-pg demo shop</h1>"
        f"<p>Served by process {os.getpid()}.</p><ul>\n{items}\n</ul></body></html>"
    )


def product(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse(product_json(get_object_or_404(Product, pk=pk)))


def listings(request: HttpRequest) -> JsonResponse:
    """An ordinary ORM list page: the newest 50 listings, every column, with their product and
    seller joined in (one 2 KB SELECT of 39 columns)."""
    rows = Listing.objects.select_related("product", "seller").order_by("-created_at")[:50]
    return JsonResponse(
        {
            "listings": [
                {**model_to_dict(row), "product": product_json(row.product), "seller": row.seller.name} for row in rows
            ]
        }
    )


def three(request: HttpRequest) -> JsonResponse:
    p = random_product()
    c = Customer.objects.filter(email=customer_email(random.randint(1, N_CUSTOMERS))).first()
    orders = Order.objects.count()
    return JsonResponse(
        {
            "product": product_json(p) if p else None,
            "customer": {"id": c.pk, "name": c.name, "email": c.email} if c else None,
            "orders": orders,
        }
    )


def slow(request: HttpRequest) -> JsonResponse:
    """A query, a wait on "another service", a query. ``?s=SECONDS`` (at most 5): the wait;
    ``?tx=1``: all three in one transaction, which holds the connection for the wait under
    ``release="transaction"`` as well (without it, that mode gives it back between the queries)."""
    with transaction.atomic() if request.GET.get("tx") == "1" else contextlib.nullcontext():
        p = random_product()
        time.sleep(min(max(float(request.GET.get("s", "0.05")), 0.0), 5.0))
        open_orders = Order.objects.filter(status=Order.Status.NEW).count()
    return JsonResponse({"product": product_json(p) if p else None, "open_orders": open_orders})


@csrf_exempt
@require_http_methods(["GET", "POST"])
def order(request: HttpRequest) -> JsonResponse:
    """Create an order with two lines and take the stock, all or nothing.

    POST is the real thing; GET does the same so that ``wrk`` and a browser can hit it. When a
    product runs out it is restocked in the same transaction so that a load test never stops.
    """
    customer = Customer.objects.filter(email=customer_email(random.randint(1, N_CUSTOMERS))).first()
    skus = [product_sku(n) for n in random.sample(range(1, N_PRODUCTS + 1), 2)]
    if customer is None:
        return no_data()
    with transaction.atomic():
        # Lock in a fixed order so concurrent orders cannot deadlock on each other's rows.
        products = list(Product.objects.select_for_update().filter(sku__in=skus).order_by("pk"))
        if len(products) < 2:
            return no_data()
        new_order = Order.objects.create(customer=customer)
        lines = []
        for p in products:
            quantity = random.randint(1, 3)
            restock = 1000 if p.stock < quantity else 0
            Product.objects.filter(pk=p.pk).update(stock=F("stock") - quantity + restock)
            lines.append(OrderLine(order=new_order, product=p, quantity=quantity, price=p.price))
        OrderLine.objects.bulk_create(lines)
    total = sum((line.price * line.quantity for line in lines), Decimal(0))
    return JsonResponse(
        {
            "order": new_order.pk,
            "customer": customer.pk,
            "lines": [{"sku": line.product.sku, "quantity": line.quantity, "price": str(line.price)} for line in lines],
            "total": str(total),
        },
        status=201 if request.method == "POST" else 200,
    )


class _Echo:
    """A file-like object whose write() hands the line back, for csv.writer in a generator."""

    def write(self, value: str) -> str:
        return value


def export_csv(request: HttpRequest) -> StreamingHttpResponse:
    """Every product, streamed: the rows come from a server-side cursor while the body is sent."""
    writer = csv.writer(_Echo())

    def rows():
        yield writer.writerow(["id", "sku", "name", "price", "stock"])
        queryset = Product.objects.order_by("pk").values_list("pk", "sku", "name", "price", "stock")
        for row in queryset.iterator(chunk_size=50):
            yield writer.writerow(row)

    response = StreamingHttpResponse(rows(), content_type="text/csv")
    response["Content-Disposition"] = 'attachment; filename="products.csv"'
    return response


async def async_view(request: HttpRequest) -> JsonResponse:
    products = await Product.objects.acount()
    p = await Product.objects.filter(sku=product_sku(random.randint(1, N_PRODUCTS))).afirst()
    new_orders = await Order.objects.filter(status=Order.Status.NEW).acount()
    latest = await Order.objects.order_by("-created_at").values("pk", "created_at").afirst()
    return JsonResponse(
        {
            "products": products,
            "product": product_json(p) if p else None,
            "new_orders": new_orders,
            "latest_order": latest,
        }
    )
