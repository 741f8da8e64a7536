"""Sphinx configuration of the django-pooled-pg documentation: ``make docs`` builds it into
``build/docs`` with warnings as errors."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

# autodoc imports the public modules, and they import Django's database layer, so Django needs
# settings. The database below is never connected to: importing the package runs no query.
settings.configure(
    INSTALLED_APPS=[
        "django.contrib.contenttypes",
        "django.contrib.auth",
        "django.contrib.admin",
        "django.contrib.sessions",
        "django.contrib.messages",
        "django_pooled_pg",
    ],
    DATABASES={"default": {"ENGINE": "django_pooled_pg", "NAME": "docs", "HOST": "127.0.0.1"}},
    USE_TZ=True,
)
django.setup()

import django_pooled_pg  # noqa: E402

project = "django-pooled-pg"
author = "the django-pooled-pg authors"
copyright = "2026, the django-pooled-pg authors"
release = version = django_pooled_pg.__version__

# myst_parser only reads CHANGELOG.md into changelog.rst; every page is reStructuredText.
extensions = ["sphinx.ext.autodoc", "myst_parser"]
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["examples", "*.md"]
root_doc = "index"
# Literal blocks (``::``) are command output and diagrams; code says its language.
highlight_language = "none"

html_theme = "furo"
html_title = f"django-pooled-pg {release}"
html_show_sourcelink = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# Nitpicky mode (-n) wants every name in a signature to resolve. Without intersphinx (the build
# works offline) names from Django, psycopg and the standard library cannot: leave them be.
nitpick_ignore_regex = [
    ("py:class", r"(django|psycopg|psycopg_pool|collections|contextlib|typing|asgiref)\..*"),
    ("py:class", r"(Any|Iterator|Iterable|Callable|HttpRequest|HttpResponse|HttpResponseBase)"),
]
# Names that docstrings mention but the reference leaves out: internal helpers, and the module
# name of fleet_stats (``stats``; the public name is ``django_pooled_pg.fleet_stats``).
nitpick_ignore = [("py:func", "held_connections"), ("py:func", "stats")]

linkcheck_timeout = 15
linkcheck_ignore = [r"http://127\.0\.0\.1[:/]"]
