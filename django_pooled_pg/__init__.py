"""django-pooled-pg: a PostgreSQL ENGINE for Django with a fork-safe, process-wide pool.

Use ``"ENGINE": "django_pooled_pg"`` in ``DATABASES`` and add ``"django_pooled_pg"`` to
``INSTALLED_APPS`` for its system checks. This module imports nothing from Django's database
layer, so importing it is always safe.
"""

__version__ = "0.1.0"
