"""Client-side cost per operation in CPU instructions, counted by ``valgrind --tool=callgrind``.

Wall-clock figures on a shared 2-core machine move by 20-50% between runs; an instruction count
does not. Each (mode, operation) runs in a child process under callgrind twice, with N1 and N2
iterations after the same warm-up; the difference divided by N2 - N1 is the cost of one
operation with the start-up (Python, Django, the first connection) cancelled out.

Operations are those of ``bench/micro.py`` (``borrow``, ``select``, ``three``) and, each followed
by the end of the request: ``long``, one 1.7 KB SELECT of 40 columns (an ordinary ORM shape);
``long3``, three of them; ``huge3``, three 20 KB statements (the same SELECT with the long
``IN (...)`` list that ``prefetch_related`` and admin actions send). Each runs as a request's
database work does (the view named, as ``PoolMiddleware`` names it); with
``--outside-requests``, as code outside any request (a management command, an executor
thread), where a borrow gives its connection back after each statement.

    python bench/instructions.py [--modes pooled,django-pool] [--ops borrow,select] [--tree DIR]
                                 [--outside-requests] [--demand off]

Operations named after a ``make bench`` endpoint (``product``, ``three``, ``listings``,
``admin``) are whole requests: the demo shop's view through Django's ``WSGIHandler`` with the
settings ``make bench`` serves it with (``bench/bench_settings.py``: ``PoolMiddleware`` and this
package's app for ours, the stock stack for the others), against a seeded ``shop`` database.
They show what a mode costs a real request, middleware and signals included.

``--tree DIR`` measures the package of another checkout (for a before/after comparison of the
borrow path: ``git worktree add /tmp/before HEAD~1``). Needs Debian's ``valgrind``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.micro import MODES  # noqa: E402

LONG_SQL = "SELECT " + ", ".join(f"{i} AS product_attribute_column_number_{i:02d}" for i in range(40))
HUGE_SQL = LONG_SQL + " WHERE 1 IN (" + ", ".join(str(1000000 + i) for i in range(2050)) + ", 1)"

#: Run in a measured process of ours: under valgrind the loop runs about 50 times slower, so a
#: connection taken back a moment after its return would often be past RECENT (50 ms) and polled
#: first, which at full speed it is not (and how often depends on the machine's load). Count the
#: full-speed path. (``bench/contended.py`` runs it too.)
UNDER_VALGRIND = (
    "import django_pooled_pg.base, django_pooled_pg.pooling.pool\n"
    "django_pooled_pg.pooling.pool.RECENT = django_pooled_pg.base.RECENT = 10.0\n"
    # The same for a thread's statements in a row (demand.DIP, 1 ms): at full speed the Python
    # between two statements takes tens of microseconds, under valgrind about a millisecond.
    "import sys\n"
    "for _name in ('django_pooled_pg.pooling.demand', 'django_pooled_pg.pooling.borrow',\n"
    "              'django_pooled_pg.pooling.pool', 'django_pooled_pg.per_statement'):\n"
    "    try:\n"
    "        __import__(_name)\n"
    "    except ImportError:  # (an older tree, measured with --tree)\n"
    "        continue\n"
    "    if hasattr(sys.modules[_name], 'DIP'):\n"
    "        sys.modules[_name].DIP = 0.05\n"
)

#: The pool's demand accounting (:mod:`django_pooled_pg.pooling.demand`) folds the events the
#: borrows recorded when it is read, or when they pile up; read it once after the loop so that
#: every run counts the folding of all its operations, not of those a threshold happened to
#: catch. (A tree without it is measured as it is.)
DEMAND_FOLDED = r"""
from django.db import connections as _connections
_pool = getattr(_connections["default"], "pool", None)
if hasattr(_pool, "demand"):
    _pool.demand.read()
"""

#: ``--demand off``: after the warm-up, the pool's demand events go to a deque that keeps none
#: (``maxlen=0``), so nothing is folded. The same code in the same process layout otherwise: the
#: difference from a normal run is what recording and folding the events costs, free of the
#: noise that comparing two trees carries (a changed module moves the interpreter's objects, and
#: with them its type-attribute cache collisions: 1-3% of an operation either way). It leaves out
#: the appends' attribute loads and the call itself (~0.1-0.2k instructions per event).
DEMAND_OFF = r"""
import os as _os
if _os.environ.get("BENCH_DEMAND") == "off":
    from collections import deque as _deque
    from django.db import connections as _connections
    _pool = getattr(_connections["default"], "pool", None)
    if hasattr(_pool, "demand"):
        _pool.demand.events = _deque(maxlen=0)
"""

#: One request through Django's ``WSGIHandler``, as a WSGI server makes it: child code that
#: needs ``path`` and ``cookie`` and defines ``request()``, and ``statuses`` (every answer's
#: status line). Used by ``VIEW_CHILD`` and ``bench/contended.py --view``.
WSGI_REQUEST = r"""
import io
from django.core.handlers.wsgi import WSGIHandler
handler, statuses = WSGIHandler(), []
def start_response(status, headers, exc_info=None):
    statuses.append(status)
def request():
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1",
               "REMOTE_ADDR": "127.0.0.1", "HTTP_COOKIE": cookie, "wsgi.input": io.BytesIO(b""),
               "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr}
    response = handler(environ, start_response)
    for _ in response:
        pass
    response.close()  # (the server's close(): Django's request_finished)
"""

CHILD = (
    r"""
import json, sys
import django
from django.conf import settings
db = json.loads(sys.argv[1]); op = sys.argv[2]; n = int(sys.argv[3])
long_sql = sys.argv[4]; huge_sql = sys.argv[5]
# No statistics publisher: its thread's periodic work would be counted in proportion to how
# long each run takes under valgrind, not per operation.
settings.configure(DATABASES={"default": db}, USE_TZ=True, POOLED_PG={"STATS_INTERVAL": None})
django.setup()
if db["ENGINE"].startswith("django_pooled_pg"):
"""
    + textwrap.indent(UNDER_VALGRIND, "    ")
    + r"""
    if sys.argv[6] == "request":
        # Each operation stands for a request's database work: PoolMiddleware names the view
        # for the whole request. (Outside one, a borrow gives back after each statement:
        # --outside-requests measures that.)
        from django_pooled_pg.pooling.ledger import current_view
        current_view.set("bench")
from django.db import connection
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
def long():
    with connection.cursor() as c:
        c.execute(long_sql); c.fetchone()
    end()
def long3():
    for _ in range(3):
        with connection.cursor() as c:
            c.execute(long_sql); c.fetchone()
    end()
def huge3():
    for _ in range(3):
        with connection.cursor() as c:
            c.execute(huge_sql); c.fetchone()
    end()
fn = {"borrow": borrow, "select": select, "three": three, "long": long, "long3": long3,
      "huge3": huge3}[op]
for _ in range(200):
    fn()
"""
    + DEMAND_OFF
    + r"""
for _ in range(n):
    fn()
"""
    + DEMAND_FOLDED
)

OPS = ("borrow", "select", "three", "long", "long3", "huge3")
#: Whole requests (see the module docstring): the endpoints of bench/run.py.
VIEW_OPS = ("product", "three-view", "listings", "admin")

VIEW_CHILD = (
    r"""
import os, sys
import django
django.setup()
if os.environ["BENCH_DATABASE"].find("django_pooled_pg") >= 0:
"""
    + textwrap.indent(UNDER_VALGRIND, "    ")
    + r"""
path, n, cookie = sys.argv[1], int(sys.argv[2]), sys.argv[3]
"""
    + WSGI_REQUEST
    + r"""
for _ in range(50):
    request()
if not statuses[-1].startswith("200"):
    sys.exit(f"{path} answered {statuses[-1]}")
"""
    + DEMAND_OFF
    + r"""
for _ in range(n):
    request()
"""
    + DEMAND_FOLDED
)


def instructions(db: dict, op: str, n: int, tree: Path, site: Site | None = None) -> int:
    """Instructions callgrind counted for the whole child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        if op in VIEW_OPS:
            assert site is not None
            env = {**site.env(db, tree), "PYTHONHASHSEED": "0"}
            program = [VIEW_CHILD, site.path(op), str(n), site.cookie]
        else:
            program = [CHILD, json.dumps(db), op, str(n), LONG_SQL, HUGE_SQL, "outside" if OUTSIDE else "request"]
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", *program],
            env=env,
            capture_output=True,
            text=True,
            cwd=tree,  # (-c puts the cwd first on sys.path)
        )
        if done.returncode != 0:
            sys.exit(f"the measured process failed:\n{done.stderr[-3000:]}")
        summary = re.search(r"^summary:\s+(\d+)", out.read_text(), re.M)
        assert summary, "callgrind wrote no summary"
        return int(summary.group(1))


#: --outside-requests: the operations (not the views) run as code outside any request does.
OUTSIDE = False


def settings_for(base: dict, mode: str) -> dict:
    """The mode's DATABASES entry, with a pool timeout long enough for a process run 50 times
    slower under valgrind (the pool opens its first connection in a background thread)."""
    db = json.loads(json.dumps({**base, **MODES[mode]}))
    pool = db.get("OPTIONS", {}).get("pool")
    if isinstance(pool, dict):
        pool["timeout"] = 300
    return db


def per_operation(db: dict, op: str, n1: int, n2: int, tree: Path, site: Site | None = None) -> float:
    return (instructions(db, op, n2, tree, site) - instructions(db, op, n1, tree, site)) / (n2 - n1)


class Site:
    """The demo shop of ``make bench`` on the cluster: the ``shop`` database migrated and seeded,
    a logged-in admin's cookie, and each mode's environment (``bench/run.py`` makes the same)."""

    PATHS = {
        "product": "/shop/product/{pid}/",
        "three-view": "/shop/three/",
        "listings": "/shop/listings/",
        "admin": "/admin/shop/listing/",
    }

    def __init__(self, cluster: Any, tree: Path) -> None:
        sys.path.insert(0, str(tree / "bench"))
        import run

        self.run, self.cluster = run, cluster
        cluster.execute(f"CREATE ROLE {run.DB_USER} LOGIN")
        cluster.execute(f"CREATE DATABASE {run.DB_NAME} OWNER {run.DB_USER}")
        env = self.env(json.loads(json.dumps(MODES["pooled"])), tree)
        manage = [sys.executable, str(tree / "testproject" / "manage.py")]
        for command in (["migrate", "--noinput", "-v", "0"], ["seed_shop"]):
            subprocess.run(manage + command, env=env, cwd=tree, check=True, capture_output=True)
        self.cookie = subprocess.run(
            manage + ["bench_login"], env=env, cwd=tree, check=True, capture_output=True, text=True
        ).stdout.strip()
        self.pid = int(cluster.execute("SELECT min(id) FROM shop_product", dbname=run.DB_NAME)[0][0])

    def env(self, db: dict, tree: Path) -> dict[str, str]:
        run = self.run
        shop = {**self.cluster.django_settings(run.DB_NAME), "USER": run.DB_USER, "CONN_MAX_AGE": 0, **db}
        # (no statistics publisher: see CHILD)
        return {
            **run.django_env(shop),
            "POOLED_PG_STATS_INTERVAL": "0",
            "PYTHONPATH": os.pathsep.join([str(tree / "bench"), str(tree / "testproject"), str(tree)]),
        }

    def path(self, op: str) -> str:
        return self.PATHS[op].format(pid=self.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="persistent,django-pool,pooled,pooled-transaction")
    parser.add_argument("--ops", default=",".join(OPS), help=f"of {', '.join(OPS + VIEW_OPS)}")
    parser.add_argument("--n1", type=int, default=200)
    parser.add_argument("--n2", type=int, default=1200)
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose package to measure")
    parser.add_argument(
        "--outside-requests",
        action="store_true",
        help="run the operations as code outside a request (a borrow gives back after each statement)",
    )
    parser.add_argument(
        "--demand",
        choices=("on", "off"),
        default="on",
        help="off: the pool's demand accounting records nothing after the warm-up (what it costs: on - off)",
    )
    args = parser.parse_args()
    global OUTSIDE
    OUTSIDE = args.outside_requests
    if args.demand == "off":
        os.environ["BENCH_DEMAND"] = "off"
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install -y valgrind")

    import django

    from testsupport.pgcluster import PgCluster

    modes, ops = args.modes.split(","), args.ops.split(",")
    results: dict[str, dict[str, float]] = {}
    with PgCluster(settings={"timezone": "UTC"}) as cluster:
        base = cluster.django_settings("postgres")
        site = Site(cluster, args.tree) if set(ops) & set(VIEW_OPS) else None
        for mode in modes:
            for op in ops:
                db = settings_for(base, mode) if op not in VIEW_OPS else settings_for({}, mode)
                value = per_operation(db, op, args.n1, args.n2, args.tree, site)
                results.setdefault(mode, {})[op] = value
                print(f"{mode:<20} {op:<8} {value / 1000:10.1f}k instructions", file=sys.stderr)
    print(
        f"Django {django.get_version()}, Python {sys.version.split()[0]}, tree {args.tree}; "
        f"instructions per operation, ({args.n2} - {args.n1}) iterations"
    )
    print(f"{'mode':<20}" + "".join(f"{op:>12}" for op in ops))
    for mode, values in results.items():
        print(f"{mode:<20}" + "".join(f"{values[op] / 1000:>11.1f}k" for op in ops))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
