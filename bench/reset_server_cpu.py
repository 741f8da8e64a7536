"""What a session reset costs the *server*: CPU time of the backend process per request, read
from ``/proc/<pid>/stat`` around 10,000 requests on one connection, for the ways a reset can
travel with a ``SELECT 1`` (modes alternating over rounds; median and the rounds).

On 2 shared cores the server's CPU comes out of the same budget as the workers', so under
``make bench`` it is throughput. ``bench/reset_cost.py`` measures the same candidates' round
trips from the client.

    python bench/reset_server_cpu.py [--rounds 3] [--n 10000]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from django_pooled_pg.pooling.session import DISCARD_ALL_STEPS  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds (run as root, or as the cluster's owner)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def simple(pgconn: Any, sql: bytes) -> None:
    """One simple-protocol query, its results read to the end."""
    from psycopg.pq import ExecStatus

    pgconn.send_query(sql)
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        select.select([pgconn.socket], [], [])
    while (result := pgconn.get_result()) is not None:
        assert result.status in (ExecStatus.TUPLES_OK, ExecStatus.COMMAND_OK), result.error_message


def pipelined(pgconn: Any, first: bytes | None, sql: bytes) -> None:
    """``first`` (if any) and ``sql`` in one pipeline with one Sync, as ``reset.py`` sends them."""
    from psycopg.pq import ExecStatus

    pgconn.enter_pipeline_mode()
    if first is not None:
        pgconn.send_query_params(first, None)
    pgconn.send_query_params(sql, None)
    pgconn.pipeline_sync()
    pgconn.flush()
    while True:
        while pgconn.is_busy():
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is not None and result.status == ExecStatus.PIPELINE_SYNC:
            break
    pgconn.exit_pipeline_mode()


QUERY = b"SELECT 1"
CANDIDATES: dict[str, Callable[[Any], None]] = {
    "SELECT 1 (no reset; Django's pool)": lambda c: simple(c, QUERY),
    "SELECT 1 alone in a pipeline": lambda c: pipelined(c, None, QUERY),
    "DISCARD ALL + SELECT 1, one pipeline (reset.py)": lambda c: pipelined(c, b"DISCARD ALL", QUERY),
    "SELECT 1 + SELECT 1, one pipeline": lambda c: pipelined(c, QUERY, QUERY),
    "RESET ALL + SELECT 1, one pipeline": lambda c: pipelined(c, b"RESET ALL", QUERY),
    "DISCARD ALL's steps; SELECT 1, one simple query": lambda c: simple(c, f"{DISCARD_ALL_STEPS}; SELECT 1".encode()),
    "DISCARD ALL, then SELECT 1 (two round trips)": lambda c: (simple(c, b"DISCARD ALL"), simple(c, QUERY)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=10000)
    args = parser.parse_args()

    import psycopg

    from testsupport.pgcluster import PgCluster

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CANDIDATES}
    with PgCluster() as cluster:
        params = cluster.django_settings("postgres")
        with psycopg.connect(
            host=params["HOST"], port=params["PORT"], user=params["USER"], dbname="postgres", autocommit=True
        ) as conn:
            pgconn, pid = conn.pgconn, conn.info.backend_pid
            for _ in range(args.rounds):
                for name, send in CANDIDATES.items():
                    for _ in range(500):
                        send(pgconn)
                    cpu, wall = backend_cpu(pid), time.perf_counter()
                    for _ in range(args.n):
                        send(pgconn)
                    results[name].append(
                        ((backend_cpu(pid) - cpu) / args.n * 1e6, (time.perf_counter() - wall) / args.n * 1e6)
                    )
    print(f"PostgreSQL server CPU per request (us), median of {args.rounds} rounds of {args.n}; round trip (us)")
    for name, runs in results.items():
        cpus = [round(r[0], 1) for r in runs]
        print(f"{name:<52}{statistics.median(cpus):>8.1f}  {cpus}  {statistics.median(r[1] for r in runs):>8.1f}")


if __name__ == "__main__":
    main()
