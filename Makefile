# The two commands of the README: `make demo` and `make test`. Everything else supports them.
SHELL := /bin/bash
VENV_DJ52 := .venv/py311-django52
VENV_DJ6  := .venv/py312-django6
# The oldest psycopg and psycopg_pool that pyproject.toml allows, on Django 5.2.
VENV_OLDEST := .venv/py311-oldest
OLDEST_PINS := "psycopg[binary]==3.3.0" "psycopg-pool==3.3.0"
PYTEST_ARGS ?=
DEMO_DATA := .pgdata-demo
DEMO_VENV := .venv/demo
DEMO_ARGS ?=
DJANGO_SUITE_ARGS ?=
BENCH_VENV := .venv/bench
BENCH_ARGS ?=

.PHONY: lint test test-django52 test-django6 test-oldest demo django-suite bench screenshot clean

test: lint test-django52 test-django6 test-oldest

# ruff's lint and format check, mypy and import-linter's layer contracts (settings in
# pyproject.toml), in the Django 6 venv.
lint: $(VENV_DJ6)/.done
	$(VENV_DJ6)/bin/ruff check .
	$(VENV_DJ6)/bin/ruff format --check .
	$(VENV_DJ6)/bin/mypy
	$(VENV_DJ6)/bin/lint-imports

test-django52: $(VENV_DJ52)/.done
	$(VENV_DJ52)/bin/python -m pytest $(PYTEST_ARGS)

test-django6: $(VENV_DJ6)/.done
	$(VENV_DJ6)/bin/python -m pytest $(PYTEST_ARGS)

test-oldest: $(VENV_OLDEST)/.done
	$(VENV_OLDEST)/bin/python -m pytest $(PYTEST_ARGS)

$(VENV_DJ52)/.done: pyproject.toml scripts/mkvenv
	scripts/mkvenv $(VENV_DJ52) 3.11 "Django>=5.2,<5.3"

$(VENV_DJ6)/.done: pyproject.toml scripts/mkvenv
	scripts/mkvenv $(VENV_DJ6) 3.12 "Django>=6.0,<7"

$(VENV_OLDEST)/.done: pyproject.toml scripts/mkvenv Makefile
	scripts/mkvenv $(VENV_OLDEST) 3.11 "Django>=5.2,<5.3" $(OLDEST_PINS)

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

# `make screenshot`: the browser test again, then its screenshot becomes the README's picture.
screenshot: $(VENV_DJ6)/.done
	$(VENV_DJ6)/bin/python -m pytest tests/test_admin_browser.py
	cp build/admin-status.png docs/admin-status.png
	cp build/admin-views.png docs/admin-views.png

django-suite: $(VENV_DJ52)/.done $(VENV_DJ6)/.done
	scripts/django-suite $(DJANGO_SUITE_ARGS)
	scripts/django-suite --only ours --release transaction $(DJANGO_SUITE_ARGS)

clean:
	-$(DEMO_VENV)/bin/python -m testsupport.pgcluster stop --datadir $(DEMO_DATA)
	rm -rf .venv $(DEMO_DATA) .django-suite
