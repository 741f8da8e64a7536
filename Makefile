# The two commands of the README: `make demo` and `make test`. Everything else supports them.
SHELL := /bin/bash
VENV_DJ52 := .venv/py311-django52
VENV_DJ6  := .venv/py312-django6
# The oldest psycopg and psycopg_pool that pyproject.toml allows, on the oldest Django 6 (6.0):
# with the Django 5.2 run and the wheel's (the newest Django 6), every version in the ranges of
# pyproject.toml, at both ends, runs the whole suite.
VENV_OLDEST := .venv/py312-oldest
OLDEST_PINS := "psycopg[binary]==3.3.6" "psycopg-pool==3.2.8"
PYTEST_ARGS ?=
DEMO_DATA := .pgdata-demo
DEMO_VENV := .venv/demo
DEMO_ARGS ?=
DJANGO_SUITE_ARGS ?=
BENCH_VENV := .venv/bench
BENCH_ARGS ?=
DOCS_VENV := .venv/docs

# The sdist and the wheel users install (python -m build: the sdist, then the wheel from it).
DIST := build/dist
# The run against the installed wheel: its venv and a copy of the tests, outside the checkout.
WHEEL_ROOT ?= $(or $(TMPDIR),/tmp)/django-pooled-pg-wheel-$(shell pwd | cksum | cut -d' ' -f1)
# The editable runs leave the wheel's own tests (marker `wheel`) to the run against the wheel.
EDITABLE := -m "not wheel"

.PHONY: lint test test-django52 test-django6 test-oldest test-wheel dist demo django-suite bench screenshot clean docs

# Django 5.2 and the oldest psycopg on editable installs; Django 6 on the built wheel.
test: lint docs test-django52 test-wheel test-oldest

# ruff's lint and format check, mypy and import-linter's layer contracts (settings in
# pyproject.toml), in the Django 6 venv.
lint: $(VENV_DJ6)/.done
	$(VENV_DJ6)/bin/ruff check .
	$(VENV_DJ6)/bin/ruff format --check .
	$(VENV_DJ6)/bin/mypy
	$(VENV_DJ6)/bin/lint-imports

test-django52: $(VENV_DJ52)/.done
	$(VENV_DJ52)/bin/python -m pytest $(EDITABLE) $(PYTEST_ARGS)

test-django6: $(VENV_DJ6)/.done
	$(VENV_DJ6)/bin/python -m pytest $(EDITABLE) $(PYTEST_ARGS)

test-oldest: $(VENV_OLDEST)/.done
	$(VENV_OLDEST)/bin/python -m pytest $(EDITABLE) $(PYTEST_ARGS)

# `twine check --strict`: what PyPI would say of the metadata and the README.
dist: $(VENV_DJ6)/.done
	rm -rf $(DIST)
	$(VENV_DJ6)/bin/python -m build --outdir $(DIST) .
	$(VENV_DJ6)/bin/python -m twine check --strict $(DIST)/*

test-wheel: dist
	scripts/test-wheel $(DIST) $(WHEEL_ROOT) $(PYTEST_ARGS)

$(VENV_DJ52)/.done: pyproject.toml scripts/mkvenv
	scripts/mkvenv $(VENV_DJ52) 3.11 "Django>=5.2,<5.3"

$(VENV_DJ6)/.done: pyproject.toml scripts/mkvenv
	scripts/mkvenv $(VENV_DJ6) 3.12 "Django>=6.0,<7"

$(VENV_OLDEST)/.done: pyproject.toml scripts/mkvenv Makefile
	scripts/mkvenv $(VENV_OLDEST) 3.12 "Django>=6.0,<6.1" $(OLDEST_PINS)

# The demo's own venv: Django 6 plus the demo extra (gunicorn, uvicorn).
$(DEMO_VENV)/.done: pyproject.toml scripts/mkvenv
	scripts/mkvenv $(DEMO_VENV) 3.12 "Django>=6.0,<7" -e ".[demo]"

demo: $(DEMO_VENV)/.done
	$(DEMO_VENV)/bin/python testproject/demo.py --datadir $(DEMO_DATA) $(DEMO_ARGS)

# `make bench`: every connection mode under gunicorn + wrk; writes bench/results/ (BENCH_ARGS: options).
$(BENCH_VENV)/.done: pyproject.toml scripts/mkvenv
	scripts/mkvenv $(BENCH_VENV) 3.12 "Django>=6.0,<7" -e ".[bench]"

bench: $(BENCH_VENV)/.done
	$(BENCH_VENV)/bin/python bench/run.py $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python bench/sizing.py $(SIZING_ARGS)

# `make screenshot`: the browser test again, then its screenshot becomes the README's picture.
screenshot: $(VENV_DJ6)/.done
	$(VENV_DJ6)/bin/python -m pytest tests/test_admin_browser.py
	cp build/admin-status.png docs/admin-status.png
	cp build/admin-views.png docs/admin-views.png

# `make docs`: the Sphinx site of docs/ in build/docs, every warning an error.
$(DOCS_VENV)/.done: pyproject.toml
	rm -rf $(DOCS_VENV)
	$$(scripts/find-python 3.12) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install --quiet -e ".[docs]" "Django>=6.0,<7"
	touch $@

docs: $(DOCS_VENV)/.done
	$(DOCS_VENV)/bin/sphinx-build -E -W --keep-going -n -b html -d build/docs-doctrees docs build/docs

django-suite: $(VENV_DJ52)/.done $(VENV_DJ6)/.done
	scripts/django-suite $(DJANGO_SUITE_ARGS)
	scripts/django-suite --only ours --release transaction $(DJANGO_SUITE_ARGS)

clean:
	-$(DEMO_VENV)/bin/python -m testsupport.pgcluster stop --datadir $(DEMO_DATA)
	rm -rf .venv $(DEMO_DATA) .django-suite $(DIST) $(WHEEL_ROOT)
