from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)
    value = models.IntegerField(default=0)


class Account(models.Model):
    balance = models.IntegerField()
