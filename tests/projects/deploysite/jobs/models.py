from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)


class Run(models.Model):
    """One django-q2 task's report: which process, server session and pool ran it."""

    n = models.IntegerField()
    kind = models.CharField(max_length=20)
    worker = models.IntegerField()
    backend = models.IntegerField()
    application_name = models.CharField(max_length=100)
    pool_name = models.CharField(max_length=100, blank=True)
    held_before = models.BooleanField()
