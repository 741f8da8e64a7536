"""In-process micro-benchmark: the cost of one borrow, and of borrow + SELECT 1 + return.

Runs each mode in its own subprocess (Django settings are per process) against one throwaway
PostgreSQL cluster, alternating modes over several rounds, and prints the median per operation:

* ``borrow``: ``connection.ensure_connection()`` then what Django runs when a request ends
  (``close_if_unusable_or_obsolete()``): the per-request overhead.
* ``select``: the same with one ``SELECT 1`` in between, as a request that runs one query.
* ``three``: three ``SELECT 1`` statements, each in its own cursor, then the end of the request:
  with ``release="transaction"`` that is three borrows and returns, so the difference from
  ``pooled`` over three is what per-statement release costs per statement.

Modes: ``pooled`` (this ENGINE), ``pooled-transaction`` (with ``release="transaction"``), ``django-pool`` (Django's ``OPTIONS["pool"]``), ``persistent``
(``CONN_MAX_AGE=None``: the connection stays open, so ``borrow`` is Django's bookkeeping only),
and ``+receiver``: the pools again with a ``connection_created`` receiver that runs
``SET search_path`` (Django's pool sends the signal on every borrow, ours once per session).

    python bench/micro.py [--rounds 5] [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {
    "pooled": {"ENGINE": "django_pooled_pg", "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}}},
    "pooled-transaction": {
        "ENGINE": "django_pooled_pg",
        "OPTIONS": {"pool": {"min_size": 1, "max_size": 2, "release": "transaction"}},
    },
    "pooled-noreset": {
        "ENGINE": "django_pooled_pg",
        "OPTIONS": {"pool": {"min_size": 1, "max_size": 2, "session_reset": False}},
    },
    "django-pool": {
        "ENGINE": "django.db.backends.postgresql",
        "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}},
    },
    "persistent": {"ENGINE": "django.db.backends.postgresql", "CONN_MAX_AGE": None},
}
#: The same modes with a connection_created receiver that sets session state (SET search_path),
#: as many projects have: Django's pool runs it on every borrow, ours once per session.
RECEIVER_MODES = ("pooled", "django-pool")

CHILD = r"""
import json, sys, time
import django
from django.conf import settings
db = json.loads(sys.argv[1]); n = int(sys.argv[2]); with_receiver = sys.argv[3] == "1"
settings.configure(DATABASES={"default": db}, USE_TZ=True)
django.setup()
from django.db import connection
if with_receiver:
    from django.db.backends.signals import connection_created
    def set_search_path(sender, connection, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SET search_path TO public")
    connection_created.connect(set_search_path)
# The end of a request: Django's request_finished handler, close_old_connections().
end = connection.close_if_unusable_or_obsolete
def borrow():
    connection.ensure_connection(); end()
def select():
    with connection.cursor() as c:
        c.execute("SELECT 1"); c.fetchone()
    end()
def three():
    for _ in range(3):
        with connection.cursor() as c:
            c.execute("SELECT 1"); c.fetchone()
    end()
out = {}
for name, fn in (("borrow", borrow), ("select", select), ("three", three)):
    for _ in range(1000):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    out[name] = (time.perf_counter() - t) / n * 1e6
print(json.dumps(out))
"""


def run(url_parts: dict, mode: str, n: int) -> dict:
    name, _, receiver = mode.partition("+")
    db = {**url_parts, **MODES[name]}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(db), str(n), "1" if receiver else "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


OPS = {
    "borrow": "borrow+return",
    "select": "borrow+SELECT 1+return",
    "three": "3 x SELECT 1+return",
}


def measure(base: dict, rounds: int, n: int) -> dict[str, dict[str, list[float]]]:
    """{mode: {op: [us per operation, one per round]}}, modes alternating within each round."""
    modes = [*MODES, *(f"{m}+receiver" for m in RECEIVER_MODES)]
    results: dict[str, dict[str, list[float]]] = {m: {op: [] for op in OPS} for m in modes}
    for _ in range(rounds):
        for mode in modes:
            for op, value in run(base, mode, n).items():
                results[mode][op].append(value)
    return results


def table(medians: dict[str, dict[str, float]]) -> str:
    lines = [f"{'mode':<30}" + "".join(f"{title + ' (us)':>28}" for title in OPS.values())]
    for mode, ops in medians.items():
        lines.append(f"{mode:<30}" + "".join(f"{ops[op]:>28.2f}" for op in OPS))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()

    import django
    import psycopg
    import psycopg_pool

    from testsupport.pgcluster import PgCluster

    with PgCluster() as cluster:
        results = measure(cluster.django_settings("postgres"), args.rounds, args.n)
    print(
        f"Django {django.get_version()}, psycopg {psycopg.__version__}, "
        f"psycopg_pool {psycopg_pool.__version__}, Python {sys.version.split()[0]}; "
        f"median of {args.rounds} rounds x {args.n} operations"
    )
    print(table({m: {op: statistics.median(v) for op, v in ops.items()} for m, ops in results.items()}))


if __name__ == "__main__":
    main()
