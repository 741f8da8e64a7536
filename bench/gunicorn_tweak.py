"""gunicorn configuration of ``bench/run.py``'s experiment modes: every worker runs the mode's
tweak (``BENCH_TWEAK``, from ``bench/contended.py``'s TWEAKS) once it has loaded Django, then
builds its middleware chain again, so that a tweak of ``MIDDLEWARE`` or of a middleware class
takes effect."""

import os


def post_worker_init(worker):  # (gunicorn's server hook: after the worker loaded the app)
    code = os.environ.get("BENCH_TWEAK")
    if code:
        exec(code, {})
        worker.wsgi.load_middleware()
