"""In-process, contended: many threads share a small pool, as in a gunicorn gthread worker.

``bench/micro.py`` and ``bench/instructions.py`` measure one thread, which always finds its own
connection again: the pool's fastest path. Under ``make bench`` a worker's 16 threads share 4
connections, and a borrower often finds its connection taken, waits in psycopg_pool's queue, or
takes one another thread left. This runs that shape in one process (``--threads`` threads, a
pool of ``--size``, each thread: borrow, ``--statements`` x ``SELECT 1``, the end of a request)
and reports, per request, the CPU time of the whole process (user + system, every thread: what
a worker pays, on 2 shared cores the figure throughput follows), the requests per second, and
the context switches (the GIL and the pool's waits hand the CPU from thread to thread).

Modes alternate within each round and each runs in its own process; the median of the rounds
is reported with the range. ``queued/request`` is psycopg_pool's count of borrows that found no
idle connection and waited in its queue (1.00: every borrow took the slow path).

``--view product`` (or ``three-view``, ``listings``, ``admin``) makes each request a page of the
demo shop through Django's ``WSGIHandler``, with the settings ``make bench`` serves it with
(``bench/bench_settings.py``: ``PoolMiddleware`` for ours, the stock stack for the others)
against a seeded ``shop`` database: the middleware, the handler's signals and the ORM, which
``SELECT 1`` leaves out. That is ``make bench``'s worker without the HTTP server.

``--perf`` adds the futex calls per request (``perf stat`` on the child, start-up included): each
time a thread waits for the GIL or a lock another holds, or wakes one that waits, it makes one.
The ``pooled-no...`` modes are experiments (see ``TWEAKS``), not settings anyone should run.

``--callgrind`` counts CPU instructions per request instead (Debian's ``valgrind``): each mode
runs under callgrind for ``--seconds`` and five times as long, and the difference in
instructions is divided by the difference in requests, which cancels the start-up. Valgrind
runs one thread at a time, so fewer borrowers find every connection taken than at full speed;
the count still takes the paths a contended borrow takes (psycopg_pool's queue, a connection
another thread gave back), which one thread alone never does.

    python bench/contended.py [--modes pooled,django-pool] [--rounds 5] [--seconds 4] [--view product]
    python bench/contended.py --callgrind [--modes ...] [--seconds 5] [--tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.instructions import UNDER_VALGRIND, VIEW_OPS, WSGI_REQUEST  # noqa: E402

MODES = {
    "pooled": {"ENGINE": "django_pooled_pg", "OPTIONS": {"pool": {}}},
    "pooled-transaction": {"ENGINE": "django_pooled_pg", "OPTIONS": {"pool": {"release": "transaction"}}},
    "pooled-noreset": {"ENGINE": "django_pooled_pg", "OPTIONS": {"pool": {"session_reset": False}}},
    "django-pool": {"ENGINE": "django.db.backends.postgresql", "OPTIONS": {"pool": {}}},
    "persistent": {"ENGINE": "django.db.backends.postgresql", "CONN_MAX_AGE": None},
}

CHILD = (
    r"""
import json, resource, sys, threading, time
import django
from django.conf import settings
db, threads, statements, seconds, tweak = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
path, cookie = sys.argv[6], sys.argv[7]
if not path:
    settings.configure(DATABASES={"default": db}, USE_TZ=True, POOLED_PG={"STATS_INTERVAL": None})
django.setup()  # (with a path: the settings make bench serves, from DJANGO_SETTINGS_MODULE)
from django.db import connection
if tweak:
    exec(tweak)
if path:  # (bench/instructions.py's WSGI_REQUEST: defines request() and statuses)
"""
    + textwrap.indent(WSGI_REQUEST, "    ")
    + r"""
counts = [0] * threads
totals = [0] * threads  # every request, warm-up included (bench/contended.py --callgrind)
phase = {"measure": False, "stop": False}
started = threading.Barrier(threads + 1)
def statements_then_end():
    for _ in range(statements):
        with connection.cursor() as c:
            c.execute("SELECT 1"); c.fetchone()
    connection.close_if_unusable_or_obsolete()
def work(i):
    one = request if path else statements_then_end
    started.wait()
    n = total = 0
    while not phase["stop"]:
        one()
        total += 1
        if phase["measure"]:
            n += 1
    counts[i], totals[i] = n, total
    connection.close()
workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
for w in workers:
    w.start()
started.wait()
time.sleep(1.0)  # warm-up: the pool full, every thread running
pool = getattr(connection, "pool", None)  # (psycopg_pool's counters: how many borrows queued)
queued0 = pool.get_stats().get("requests_queued", 0) if pool is not None else 0
usage0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
phase["measure"] = True
time.sleep(seconds)
phase["measure"] = False
usage1, cpu1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
queued1 = pool.get_stats().get("requests_queued", 0) if pool is not None else 0
phase["stop"] = True
for w in workers:
    w.join()
n = sum(counts)
if path and not all(s.startswith("200") for s in statuses):
    sys.exit(f"{path} answered {sorted(set(statuses))}")
print(json.dumps({
    "cpu_us": (cpu1 - cpu0) / n * 1e6,
    "rps": n / (wall1 - wall0),
    "user_us": (usage1.ru_utime - usage0.ru_utime) / n * 1e6,
    "sys_us": (usage1.ru_stime - usage0.ru_stime) / n * 1e6,
    "requests": sum(totals),
    "queued": (queued1 - queued0) / n,
    "switches": ((usage1.ru_nvcsw - usage0.ru_nvcsw) + (usage1.ru_nivcsw - usage0.ru_nivcsw)) / n,
}))
"""
)

#: Variants of ours, for experiments: Python run in the child after django.setup().
TWEAKS = {
    # No connection kept for the thread's next borrow: every return goes to psycopg_pool.
    "pooled-nokeep": (
        "pooled",
        "import django_pooled_pg.pooling.pool as p\n"
        "_init = p.Pool.__init__\n"
        "def init(self, *a, **k):\n"
        "    _init(self, *a, **k); self.can_keep = self._keeps = False\n"
        "p.Pool.__init__ = init\n",
    ),
    # With --view: PoolMiddleware left out (requests give back at Django's request_finished),
    # its process_view left out (borrows keep the path's name), and its give-back left to
    # request_finished; experiments that say what the middleware's parts cost (the handler is
    # made after the tweak runs, so it reads the changed settings and class).
    "pooled-nomiddleware": (
        "pooled",
        "from django.conf import settings\n"
        "settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if not m.endswith('.PoolMiddleware')]\n",
    ),
    "pooled-noprocessview": ("pooled", "import django_pooled_pg.middleware as m\ndel m.PoolMiddleware.process_view\n"),
    "pooled-norelease": (
        "pooled",
        "import django_pooled_pg.middleware as m\nm.release_connections = lambda view=None, held=None: 0\n",
    ),
}


def run(
    base: dict,
    mode: str,
    threads: int,
    size: int,
    statements: int,
    seconds: float,
    tree: Path,
    valgrind: bool = False,
    view: tuple[Any, str] | None = None,
    perf: bool = False,
) -> dict:
    """The child's figures; with ``valgrind``, plus ``instructions``: callgrind's count for the
    whole process. With ``view`` (a :class:`bench.instructions.Site` and one of its operations),
    each request is that page of the demo shop through Django's ``WSGIHandler``."""
    name, tweak = TWEAKS.get(mode, (mode, ""))
    db = json.loads(json.dumps({**base, **MODES[name]}))
    pool = db.get("OPTIONS", {}).get("pool")
    if pool is not None:
        pool.update(min_size=size, max_size=size, timeout=300 if valgrind else 30)
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    path = cookie = ""
    if view is not None:
        site, op = view
        env, path, cookie = {**site.env(db, tree), "PYTHONHASHSEED": "0"}, site.path(op), site.cookie
    with tempfile.TemporaryDirectory() as tmp:
        prefix = []
        if valgrind:
            prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out"]
            if db["ENGINE"] == "django_pooled_pg":
                tweak += "\n" + UNDER_VALGRIND
        elif perf:
            prefix = ["perf", "stat", "-x,", "-e", "syscalls:sys_enter_futex", "-o", f"{tmp}/perf.csv", "--"]
        out = subprocess.run(
            [
                *prefix,
                sys.executable,
                "-c",
                CHILD,
                json.dumps(db),
                *map(str, (threads, statements, seconds)),
                tweak,
                path,
                cookie,
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=tree,
        )
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout)
        if valgrind:
            summary = re.search(r"^summary:\s+(\d+)", Path(f"{tmp}/callgrind.out").read_text(), re.M)
            assert summary, "callgrind wrote no summary"
            result["instructions"] = int(summary.group(1))
        if perf and not valgrind:
            # (the whole child, start-up included: a few hundred calls, under 1% of a 4 s run's)
            futex = re.search(r"^(\d+),.*sys_enter_futex", Path(f"{tmp}/perf.csv").read_text(), re.M)
            result["futex"] = int(futex.group(1)) / result["requests"] if futex else float("nan")
    return result


#: What each figure is, in the order the tables show them, and its format.
FIGURES = (
    ("cpu_us", "CPU µs/request", "{:.1f}"),
    ("user_us", "user", "{:.1f}"),
    ("sys_us", "system", "{:.1f}"),
    ("rps", "requests/s", "{:.0f}"),
    ("switches", "switches/request", "{:.2f}"),
    ("queued", "queued/request", "{:.2f}"),
)
DEFAULT_MODES = ("persistent", "django-pool", "pooled", "pooled-transaction")
#: The shape of a gunicorn gthread worker under ``make bench``: its threads, its pool's size.
THREADS, SIZE = 16, 4


def measure(
    base: dict,
    modes: list[str] | tuple[str, ...],
    rounds: int,
    *,
    threads: int = THREADS,
    size: int = SIZE,
    statements: int = 1,
    seconds: float = 4.0,
    tree: Path = ROOT,
    view: tuple[Any, str] | None = None,
    perf: bool = False,
) -> dict[str, list[dict]]:
    """{mode: [the child's figures, one per round]}, modes alternating within each round."""
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            results[mode].append(run(base, mode, threads, size, statements, seconds, tree, view=view, perf=perf))
    return results


def cells(runs: list[dict]) -> list[str]:
    """Each figure's median and range over the rounds."""
    out = []
    for key, _, fmt in FIGURES:
        values = [r[key] for r in runs]
        out.append(f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})")
    return out


def table(results: dict[str, list[dict]]) -> str:
    """The console table of :func:`measure`'s results (``make bench`` prints it too)."""
    lines = [f"{'mode':<22}" + "".join(f"{title:>24}" for _, title, _ in FIGURES)]
    lines += [f"{mode:<22}" + "".join(f"{cell:>24}" for cell in cells(runs)) for mode, runs in results.items()]
    if any("futex" in r for runs in results.values() for r in runs):
        lines += ["", "futex calls per request (perf stat), each round:"]
        lines += [f"{mode:<22}" + ", ".join(f"{r['futex']:.2f}" for r in runs) for mode, runs in results.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {', '.join([*MODES, *TWEAKS])}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--size", type=int, default=SIZE, help="the pool's min_size = max_size")
    parser.add_argument("--statements", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose package to measure")
    parser.add_argument("--callgrind", action="store_true", help="count instructions per request instead")
    parser.add_argument("--perf", action="store_true", help="also count futex calls per request (perf stat)")
    parser.add_argument(
        "--view", choices=VIEW_OPS, help="each request is this page of the demo shop, through Django's WSGIHandler"
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    if args.perf and shutil.which("perf") is None:
        parser.error("--perf needs perf: apt-get install -y linux-perf")
    unknown = [m for m in modes if m not in MODES and m not in TWEAKS]
    if unknown:
        parser.error(f"unknown mode {', '.join(unknown)}; choose from {', '.join([*MODES, *TWEAKS])}")
    if args.callgrind:
        return count_instructions(args, modes)

    from testsupport.pgcluster import PgCluster

    with PgCluster() as cluster:
        view = site_view(cluster, args)
        results = measure(
            {} if view else cluster.django_settings("postgres"),
            modes,
            args.rounds,
            threads=args.threads,
            size=args.size,
            statements=args.statements,
            seconds=args.seconds,
            tree=args.tree,
            view=view,
            perf=args.perf,
        )
    print(header(args) + f"median (range) of {args.rounds} rounds of {args.seconds:g} s")
    print(table(results))


def header(args: argparse.Namespace) -> str:
    """The versions and the run's shape, for the first line of the output."""
    import django
    import psycopg

    what = f"GET {args.view}" if args.view else f"{args.statements} x SELECT 1"
    return (
        f"Django {django.get_version()}, psycopg {psycopg.__version__}, Python {sys.version.split()[0]}; "
        f"{args.threads} threads, pool of {args.size}, {what} per request; "
    )


def site_view(cluster: Any, args: argparse.Namespace) -> tuple[Any, str] | None:
    """With ``--view``: the demo shop on the cluster, and the page."""
    if not args.view:
        return None
    from bench.instructions import Site

    return Site(cluster, args.tree), args.view


def count_instructions(args: argparse.Namespace, modes: list[str]) -> None:
    from testsupport.pgcluster import PgCluster

    print(header(args) + f"callgrind, runs of {args.seconds:g} s and {5 * args.seconds:g} s")
    with PgCluster() as cluster:
        view = site_view(cluster, args)
        base = {} if view else cluster.django_settings("postgres")
        for _ in range(args.rounds):
            for mode in modes:
                short, long = (
                    run(base, mode, args.threads, args.size, args.statements, s, args.tree, valgrind=True, view=view)
                    for s in (args.seconds, 5 * args.seconds)
                )
                per = (long["instructions"] - short["instructions"]) / (long["requests"] - short["requests"])
                print(
                    f"{mode:<22}{per / 1000:>10.1f}k instructions per request ({short['requests']} and "
                    f"{long['requests']} requests; {long['queued']:.2f} borrows queued per request)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
