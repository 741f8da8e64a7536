"""What a session reset costs: the round trip of each candidate statement on one connection,
against a throwaway cluster, modes alternating over rounds (median and range of the rounds).

* ``SELECT 1``: the floor, any round trip;
* ``DISCARD ALL``: the reset of a session with nothing set up beyond its startup packet;
* ``steps + baseline``: DISCARD ALL's steps and a set_config() of a baseline setting (a session
  whose connection_created receiver ran ``SET search_path``);
* ``state check``: a query that finds whether anything needs resetting (session settings,
  temporary tables, advisory locks, LISTEN, prepared statements, WITH HOLD cursors), the
  alternative of resetting only dirty sessions: it costs a round trip too, and more server time.

    python bench/reset_cost.py [--rounds 5] [--n 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from django_pooled_pg.pooling.session import reset_statement  # noqa: E402

STATE_CHECK = (
    "SELECT (SELECT count(*) FROM pg_settings WHERE source = 'session')"
    " + (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())"
    " + (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())"
    " + (SELECT count(*) FROM pg_listening_channels())"
    " + (SELECT count(*) FROM pg_prepared_statements)"
    " + (SELECT count(*) FROM pg_cursors WHERE is_holdable)"
)
CANDIDATES = {
    "SELECT 1": "SELECT 1",
    "DISCARD ALL": reset_statement(),
    "steps + baseline": reset_statement([("search_path", "public")]),
    "state check": STATE_CHECK,
}


def round_trip_us(conn, sql: str, n: int) -> float:
    pgconn, query = conn.pgconn, sql.encode()
    started = time.perf_counter()
    for _ in range(n):
        pgconn.send_query(query)
        while pgconn.get_result() is not None:
            pass
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()

    import psycopg

    from testsupport.pgcluster import PgCluster

    with PgCluster() as cluster:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            results: dict[str, list[float]] = {name: [] for name in CANDIDATES}
            for _ in range(args.rounds):
                for name, sql in CANDIDATES.items():
                    results[name].append(round_trip_us(conn, sql, args.n))
    print(f"round trip per statement, us: median (min-max) of {args.rounds} rounds x {args.n}")
    for name, values in results.items():
        print(f"{name:<18} {statistics.median(values):8.1f}  ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
