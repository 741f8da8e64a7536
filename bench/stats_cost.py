"""What recording pool statistics costs per borrow: borrow + return with and without it.

Recording is: a counter increment in the ledger, one ``Histogram.record`` for the wait at borrow
and one for the hold at return, and three counter additions at return. This runs the ``borrow``
loop of ``bench/micro.py`` (``ensure_connection()`` then ``close_if_unusable_or_obsolete()``) in
the ``pooled`` mode, alternating blocks of 1,000 with recording as shipped and with
``Histogram.record`` made a no-op, in one process per round against one throwaway cluster, and
also times ``Histogram.record`` alone.

    python bench/stats_cost.py [--rounds 7] [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, statistics, sys, time
import django
from django.conf import settings
db = json.loads(sys.argv[1]); n = int(sys.argv[2])
settings.configure(DATABASES={"default": db}, USE_TZ=True, POOLED_PG={"STATS_INTERVAL": None})
django.setup()
from django.db import connection
from django_pooled_pg.pooling.stats import Histogram
real, noop = Histogram.record, lambda self, seconds: None
end = connection.close_if_unusable_or_obsolete
def borrow():
    connection.ensure_connection(); end()
for _ in range(2000):
    borrow()
# Alternate short blocks with and without recording, so that drift (a loaded machine, CPU
# frequency) hits both alike; the median block of each.
blocks = {"on": [], "off": []}
block = 1000
for i in range(2 * (n // block)):
    mode = "on" if i % 2 == 0 else "off"
    Histogram.record = real if mode == "on" else noop
    t = time.perf_counter()
    for _ in range(block):
        borrow()
    blocks[mode].append((time.perf_counter() - t) / block * 1e6)
print(json.dumps({mode: statistics.median(v) for mode, v in blocks.items()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()

    from django_pooled_pg.pooling.stats import Histogram
    from testsupport.pgcluster import PgCluster

    h = Histogram()
    alone = min(timeit.repeat(lambda: h.record(0.000123), number=200_000, repeat=5)) / 200_000 * 1e6
    results: dict[str, list[float]] = {"on": [], "off": []}
    with PgCluster() as cluster:
        db = {
            **cluster.django_settings("postgres"),
            "ENGINE": "django_pooled_pg",
            "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}},
        }
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for _ in range(args.rounds):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(db), str(args.n)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            for mode, value in json.loads(out.stdout).items():
                results[mode].append(value)
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    print(f"median of {args.rounds} rounds x {args.n} borrow+return per mode:")
    print(f"  with recording    {on:6.2f} us")
    print(f"  histograms off    {off:6.2f} us")
    print(f"  difference        {on - off:6.2f} us per borrow (two Histogram.record calls)")
    print(f"  Histogram.record  {alone:6.3f} us per call, timed alone")


if __name__ == "__main__":
    main()
