import json

from django.db import connection
from django.http import HttpResponseNotAllowed, JsonResponse

from .models import Category, Product


def _names():
    # select_related over the whole row: an ORM statement of ordinary length.
    return [p.name for p in Product.objects.select_related("category").all()]


def products(request):
    if request.method == "POST":
        category = Category.objects.filter(slug=request.POST.get("category", "books")).first()
        product = Product.objects.create(name=request.POST["name"], category=category)
        return JsonResponse({"id": product.pk, "names": _names()})
    if request.method == "GET":
        return JsonResponse({"names": _names()})
    return HttpResponseNotAllowed(["GET", "POST"])


async def products_async(request):
    names = [p.name async for p in Product.objects.select_related("category").all()]
    if request.method == "POST":
        await Product.objects.acreate(name=request.POST["name"])
        names.append(request.POST["name"])
    return JsonResponse({"names": sorted(names)})


def state(request):
    """After one query: does this thread still hold a connection? With release="transaction"
    nothing should pin it, whatever wraps the cursors."""
    count = Product.objects.count()
    held = connection.connection is not None
    return JsonResponse({"count": count, "held": held})


def set_session(request):
    """Leaves session state behind, as careless code does."""
    value = json.loads(request.body or b"{}").get("timeout", "1234ms")
    with connection.cursor() as cursor:
        cursor.execute(f"SET statement_timeout = '{value}'")
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    return JsonResponse({"pid": pid})


def show_session(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('statement_timeout'), pg_backend_pid()")
        timeout, pid = cursor.fetchone()
    return JsonResponse({"statement_timeout": timeout, "pid": pid})


def backend_pid(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return JsonResponse({"pid": cursor.fetchone()[0]})
