import os

from django.http import JsonResponse

from .probe import probe


def health(request):
    return JsonResponse({"pid": os.getpid()})


def query(request):
    """``?hold=SECONDS``: the connection is held that long in the server (``pg_sleep``)."""
    return JsonResponse(probe(min(float(request.GET.get("hold", "0")), 10.0)))
