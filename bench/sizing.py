#!/usr/bin/env python
"""Pool sizes under a load that changes: fixed sizes against ``--advise`` and ``max_size="auto"``.

A gunicorn fleet (``--workers`` x ``--threads``) serves the demo shop's ``slow`` view with
``tx=1`` (a query, a wait, a query, in one transaction: the connection is held for the wait in
both release modes) under an open-loop load: requests are sent at a fixed rate, each on its own
connection, whether or not earlier ones were answered, so that queueing shows as latency instead
of slowing the sender down. Latency runs from the moment a request was due to the end of its
answer. The load changes in four phases of ``--phase`` seconds:

1. ``base``: ``--rate`` requests per second, each holding its connection ``--hold`` seconds;
2. ``hold x5``: the same rate, holds five times as long;
3. ``traffic x3``: three times the rate, the first hold;
4. ``back``: as in phase 1.

The fleet runs once per pool: every fixed size of ``--sizes`` (the smallest is "too small", the
largest "too large"; the best fixed size per phase is the smallest without 503s whose p99 is
within :data:`TIE` of the sweep's lowest), the size ``poolstats --advise`` advised after phase 1
of the largest size's run, and ``"auto"`` under a fleet budget (``--budget``,
``fleet_max_size``: each process's fair share is its ceiling; with ``--budget 0``,
``max_size_limit`` the largest size). A borrower that waits ``--pool-timeout`` (0.5 s: a pool's
queue is at most a worker's threads long, and sixteen holds of 50 ms queued for one connection
take 0.8 s) gets a 503, so a pool too small shows as 503s. Per phase and pool: requests answered
per second, p50 and p99 latency, 503s and other failures, and the peak and mean of the server's
backends (``pg_stat_activity``, every 100 ms). It writes ``SIZING.md``, ``sizing.png`` and the raw
figures (``raw/sizing.json``) under ``--output``.

    python bench/sizing.py [--release request|transaction] [--rate 40] [--hold 0.01]
                           [--phase 15] [--workers 2] [--threads 16] [--sizes 1,2,3,4,6,8,16]
                           [--budget 12] [--rounds 1] [--pool-timeout 0.5] [--stats-interval 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from run import (  # noqa: E402
    DB_NAME,
    DB_USER,
    TESTPROJECT,
    Gunicorn,
    Sampler,
    database,
    django_env,
    log,
    wait_no_backends,
)

from testsupport.pgcluster import PgCluster  # noqa: E402

#: (name, rate multiplier, hold multiplier)
PHASES = (("base", 1, 1), ("hold x5", 1, 5), ("traffic x3", 3, 1), ("back", 1, 1))
#: Fixed sizes whose p99 is within this share of the lowest tie, and the smallest of them is the
#: best: the issue's own tolerance for "as good as the best size" (auto's target), and above what
#: one configuration's p99 moves between rounds here (a base phase's sizes 1 to 16 spanned
#: 19.2-20.8 ms, each round of one of them up to 2.6 ms apart), so that noise does not pick a
#: larger size for a phase where every size serves the same.
TIE = 0.10
#: Rounds from which each pool's median of its rounds' p99s is reported, and the targets read on
#: it too (:func:`robust_reading`): a median of two is their mean, and leaves no stall out.
MEDIAN_ROUNDS = 3
#: Seconds a request may take before it counts as failed.
REQUEST_TIMEOUT = 10.0


# ----- The open-loop load ------------------------------------------------------------------------


async def one_request(host: str, port: int, path: str, due: float, out: list[tuple[float, int]]) -> None:
    """GET ``path`` on a new connection; appends (seconds since ``due``, status; 0 for a failure)."""
    status = 0
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readline()
            await reader.read()  # (to the end: the server closes)
            writer.close()
            status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    except (OSError, TimeoutError, ValueError, IndexError):
        status = 0
    out.append((time.monotonic() - due, status))


async def open_loop(host: str, port: int, path: str, rate: float, seconds: float) -> list[tuple[float, int]]:
    """Requests at ``rate`` per second, evenly spaced, for ``seconds``; every answer's
    (latency, status). A request is sent when due whatever the earlier ones are doing."""
    out: list[tuple[float, int]] = []
    tasks = []
    start = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(host, port, path, due, out)))
    await asyncio.gather(*tasks)
    return out


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 of ``values`` (milliseconds, rounded), 0 for none."""
    if len(values) < 2:
        one = round(values[0], 1) if values else 0.0
        return one, one
    q = statistics.quantiles(values, n=100)
    return round(q[49], 1), round(q[98], 1)


def summary(answers: list[tuple[float, int]], seconds: float) -> dict[str, Any]:
    """One phase of one run: its figures, and the answered requests' latencies (ms) that
    :func:`combine` pools over the rounds."""
    ok = sorted(round(lat * 1000, 2) for lat, status in answers if status == 200)
    p50, p99 = percentiles(ok)
    return {
        "sent": len(answers),
        "rps": round(len(ok) / seconds, 1),
        "p50_ms": p50,
        "p99_ms": p99,
        "503": sum(1 for _, status in answers if status == 503),
        "failed": sum(1 for _, status in answers if status not in (200, 503)),
        "ok_ms": ok,
    }


def combine(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One pool's phases over its rounds: p50 and p99 of every round's answers together (the
    rounds' own p99s, lowest and highest, beside them), the median req/s, 503s and failures
    added up, the highest peak of backends.

    A 15-second phase at 120 req/s has 1,800 answers, and its p99 is the 18th slowest: a few
    stalls of the shared machine decide it. Pooled over three rounds it rests on 54."""
    out = []
    for rows in zip(*rounds, strict=True):
        p99 = [r["p99_ms"] for r in rows]
        p50, p99_all = percentiles([lat for r in rows for lat in r["ok_ms"]])
        # (The median of the rounds' p99s, from three rounds: report() reads the targets on it too.)
        median = {"p99_median": round(statistics.median(p99), 1)} if len(rows) >= MEDIAN_ROUNDS else {}
        out.append({
            "phase": rows[0]["phase"],
            "sent": sum(r["sent"] for r in rows),
            "rps": round(statistics.median(r["rps"] for r in rows), 1),
            "p50_ms": p50,
            "p99_ms": p99_all,
            "p99_range": [min(p99), max(p99)],
            "503": sum(r["503"] for r in rows),
            "failed": sum(r["failed"] for r in rows),
            "peak_backends": max(r["peak_backends"] for r in rows),
            "peaks": [r["peak_backends"] for r in rows],
            "mean_backends": round(statistics.fmean(r["mean_backends"] for r in rows), 1),
            **median,
        })  # fmt: skip
    return out


# ----- One fleet ---------------------------------------------------------------------------------


def pool_options(size: int | str, args: argparse.Namespace) -> dict[str, Any]:
    pool: dict[str, Any] = {"min_size": 1, "max_size": size, "timeout": args.pool_timeout, "release": args.release}
    if size == "auto":
        if args.budget:  # (the ceiling: each process's fair share of the fleet's connections)
            pool["fleet_max_size"] = args.budget
        else:
            pool["max_size_limit"] = max(args.sizes)
    return pool


def run_fleet(cluster: PgCluster, args: argparse.Namespace, size: int | str, outdir: Path, advise: bool = False):
    """The four phases against one pool size; per phase its figures, and the advice after phase
    1 when ``advise``."""
    db = database("pooled-request", cluster, 1, args.pool_timeout, None)
    db["OPTIONS"] = {"pool": pool_options(size, args)}
    env = {**django_env(db), "POOLED_PG_STATS_INTERVAL": f"{args.stats_interval:g}", "POOLED_PG_PRUNE_AFTER": "30"}
    wait_no_backends(cluster)
    cluster.execute("DELETE FROM django_pooled_pg_poolsnapshot", dbname=DB_NAME)
    server = Gunicorn(env, args.workers, args.threads, outdir / f"gunicorn-sizing-{size}.log")
    server.start()
    phases: list[dict[str, Any]] = []
    advice = None
    try:
        server.wait_ready("/shop/slow/?s=0")
        for name, rate_x, hold_x in PHASES:
            path = f"/shop/slow/?tx=1&s={args.hold * hold_x:g}"
            sampler = Sampler(cluster)
            sampler.start()
            began = time.monotonic()
            answers = asyncio.run(open_loop("127.0.0.1", server.port, path, args.rate * rate_x, args.phase))
            seconds = time.monotonic() - began
            phases.append({"phase": name, **summary(answers, seconds), **sampler.finish()})
            log(f"  {size}: {name}: " + str({k: v for k, v in phases[-1].items() if k != "ok_ms"}))
            if advise and name == PHASES[0][0]:
                time.sleep(args.stats_interval + 0.5)  # (a publication after the phase's last requests)
                advice = advised_size(env)
    finally:
        server.stop()
    return phases, advice


def advised_size(env: dict[str, str]) -> int | None:
    res = subprocess.run(
        [sys.executable, str(TESTPROJECT / "manage.py"), "poolstats", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    advice = json.loads(res.stdout)["aliases"]["default"]["advice"]
    log(f"  advice after phase 1: max_size {advice['max_size']}; " + " | ".join(advice["lines"][1:3]))
    return advice["max_size"]


# ----- Report ------------------------------------------------------------------------------------


def best_fixed(results: dict[str, list[dict]], sizes: list[int], key: str = "p99_ms") -> list[tuple[int, dict]]:
    """Per phase: the fixed size with the lowest p99 (``key``) and no 503s or failures (the
    smallest such size when p99s tie within :data:`TIE`)."""
    best = []
    for i, _ in enumerate(PHASES):
        clean = [(s, results[str(s)][i]) for s in sizes if not results[str(s)][i]["503"] + results[str(s)][i]["failed"]]
        clean = clean or [(s, results[str(s)][i]) for s in sizes]
        low = min(r[key] for _, r in clean)
        best.append(next((s, r) for s, r in clean if r[key] <= low * (1 + TIE)))
    return best


def report(data: dict[str, Any], outdir: Path) -> None:
    results, sizes = data["results"], data["sizes"]
    best = best_fixed(results, sizes)
    a = data["args"]
    lines = [
        f"# Pool sizing under a changing load ({data['date']})",
        "",
        f"`python bench/sizing.py {data['argv']}`: gunicorn gthread {a['workers']} workers x {a['threads']} "
        f"threads, release={a['release']!r}, the shop's `slow` view with `tx=1`; open-loop load, "
        f"{a['phase']:g} s per phase: base {a['rate']:g} req/s holding {a['hold'] * 1000:g} ms, hold x5, "
        f"traffic x3, back. Sizes are per process. {data['machine']}",
        "",
        f"Advised after phase 1 (`poolstats --advise` on the {max(sizes)}-connection run): "
        f"**{data.get('advised') or 'none (too little data)'}**. Best fixed size per phase (lowest p99 without 503s, the smallest within "
        f"{TIE:.0%}): " + ", ".join(f"{PHASES[i][0]} **{s}**" for i, (s, _) in enumerate(best)),
        "",
        f"Rounds: {a.get('rounds', 1)} (one round of every pool after the other); per phase p50 and p99 of "
        "all rounds' answers together (each round's own p99, lowest and highest, in brackets; with three "
        "rounds or more, their median), the median "
        "req/s, the 503s and failures of all rounds, the highest peak of backends (each round's in brackets). "
        f"Pool timeout {a.get('pool_timeout', 5.0):g} s, statistics published every "
        f"{a.get('stats_interval', 1.0):g} s.",
        "",
        "| phase | pool | req/s | p50 ms | p99 ms | 503 | failed | backends peak | mean |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = [str(s) for s in sizes] + (["advised"] if "advised" in results else []) + ["auto"]
    for i, (phase, _, _) in enumerate(PHASES):
        for name in order:
            r = results[name][i]
            label = name if name in ("advised", "auto") else f"fixed {name}"
            if name == str(best[i][0]):
                label += " (best)"
            lines.append(
                f"| {phase} | {label} | {r['rps']} | {r['p50_ms']} | {p99_cell(r)} | {r['503']} | {r['failed']} "
                f"| {peak_cell(r)} | {r['mean_backends']} |"
            )
    lines += ["", "Targets (issue 32):", ""]
    auto, small, large = results["auto"], results[str(min(sizes))], results[str(max(sizes))]
    for i, (phase, _, _) in enumerate(PHASES):
        b = best[i][1]
        lines.append(
            f"- {phase}: auto p99 {auto[i]['p99_ms']} ms against the best fixed {b['p99_ms']} ms "
            f"({auto[i]['p99_ms'] / b['p99_ms'] - 1:+.0%}; target within +10%); 503s auto {auto[i]['503']}, "
            f"small pool {small[i]['503']}; peak backends auto {auto[i]['peak_backends']}, large pool "
            f"{large[i]['peak_backends']}" + (f", fleet budget {a['budget']}" if a.get("budget") else "")
        )
    if data.get("advised") is not None:
        lines.append(
            f"- advised {data['advised']} against the best fixed size of phase 1, {best[0][0]} (target: within 1)"
        )
    if "p99_median" in results["auto"][0]:
        lines += robust_reading(results, sizes, best_fixed(results, sizes, "p99_median"))
    (outdir / "SIZING.md").write_text("\n".join(lines) + "\n")
    chart(data, order, outdir / "sizing.png")


def robust_reading(results: dict[str, list[dict]], sizes: list[int], best: list[tuple[int, dict]]) -> list[str]:
    """The p99 targets read on the median of the rounds' own p99s, for each pool alike.

    The p99 of all rounds' answers together is decided by the worst round: one stall of the
    shared machine during one pool's round (a fixed 8's traffic x3 at 24.7 ms in one round and
    69.8 ms in another, in the same run) moves it by more than the 10% the target allows, and
    the best fixed size, the lowest of seven such figures, is the luckiest of them. The median
    of three or more rounds leaves one stall out."""
    auto = results["auto"]
    lines = ["", "The same targets on the median of each pool's per-round p99s (one bad round left out):", ""]
    for i, (phase, _, _) in enumerate(PHASES):
        size, b = best[i]
        mine, theirs = auto[i]["p99_median"], b["p99_median"]
        lines.append(
            f"- {phase}: auto {mine} ms against the best fixed ({size}) {theirs} ms ({mine / theirs - 1:+.0%}; "
            "target within +10%)"
        )
    return lines


def p99_cell(r: dict[str, Any]) -> str:
    low, high = r.get("p99_range", [r["p99_ms"]] * 2)
    median = f", median {r['p99_median']}" if "p99_median" in r else ""
    return f"{r['p99_ms']}" if low == high else f"{r['p99_ms']} ({low}-{high}{median})"


def peak_cell(r: dict[str, Any]) -> str:
    peaks = r.get("peaks", [])
    return f"{r['peak_backends']}" if len(set(peaks)) < 2 else f"{r['peak_backends']} ({'/'.join(map(str, peaks))})"


def chart(data: dict[str, Any], order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    width = 0.8 / len(order)
    for k, name in enumerate(order):
        rows = data["results"][name]
        xs = [i + k * width for i in range(len(PHASES))]
        top.bar(xs, [r["p99_ms"] for r in rows], width, label=name if name in ("advised", "auto") else f"fixed {name}")
        bottom.bar(xs, [r["peak_backends"] for r in rows], width)
    top.set_ylabel("p99 latency (ms)")
    top.set_yscale("log")
    bottom.set_ylabel("peak server backends")
    bottom.set_xticks([i + 0.4 - width / 2 for i in range(len(PHASES))], [p[0] for p in PHASES])
    top.legend(ncol=4, fontsize=8)
    top.set_title("Pool sizes under a changing open-loop load (bench/sizing.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----- Main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", choices=("request", "transaction"), default="request")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second in the base phase")
    parser.add_argument("--hold", type=float, default=0.01, help="seconds each request holds its connection (base)")
    parser.add_argument("--phase", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--sizes", type=lambda v: sorted(int(x) for x in v.split(",")), default=[1, 2, 3, 4, 6, 8, 16])
    parser.add_argument(
        "--pool-timeout", type=float, default=0.5,
        help="the pool's timeout (seconds): a borrower that waits longer gets a 503, as the too-small pool's do",
    )  # fmt: skip
    parser.add_argument(
        "--stats-interval", type=float, default=5.0,
        help="POOLED_PG['STATS_INTERVAL'] in the fleet (the package's default; --advise reads the publications)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="runs of every pool, one round of all after the other; per phase the p99 of all rounds' answers counts",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=int, default=12,
        help="fleet_max_size for the auto run (its ceiling: a fair share per process); 0: max_size_limit the largest size",
    )  # fmt: skip
    parser.add_argument("--output", default=str(BENCH / "results"))
    parser.add_argument("--report", metavar="RAW", help="only write the report again from a run's raw/sizing.json")
    args = parser.parse_args(argv)
    outdir = Path(args.output)
    if args.report:
        outdir.mkdir(parents=True, exist_ok=True)
        report(json.loads(Path(args.report).read_text()), outdir)
        log(f"wrote {outdir / 'SIZING.md'}")
        return 0
    rawdir = outdir / "raw"
    rawdir.mkdir(parents=True, exist_ok=True)
    from run import machine

    data: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "sizes": args.sizes,
        "results": {},
    }
    cluster = PgCluster(max_connections=100, settings={"timezone": "UTC"})
    try:
        cluster.start()
        prepare(cluster)
        m = machine()
        data["machine"] = ", ".join(f"{k} {v}" for k, v in m.items())
        runs: dict[str, list[list[dict[str, Any]]]] = {}
        for k in range(args.rounds):  # (rounds one after the other: a drift of the machine hits all pools)
            for size in sorted(args.sizes, reverse=True):  # (the largest first: its phase 1 gives the advice)
                log(f"round {k + 1}: fixed max_size {size}")
                advise = k == 0 and size == max(args.sizes)
                phases, advice = run_fleet(cluster, args, size, rawdir, advise=advise)
                runs.setdefault(str(size), []).append(phases)
                if advice is not None:
                    data["advised"] = advice
            if data.get("advised") is not None:
                log(f"round {k + 1}: advised max_size {data['advised']}")
                runs.setdefault("advised", []).append(run_fleet(cluster, args, data["advised"], rawdir)[0])
            log(f"round {k + 1}: max_size auto")
            runs.setdefault("auto", []).append(run_fleet(cluster, args, "auto", rawdir)[0])
        data["rounds"] = runs
        data["results"] = {name: combine(rounds) for name, rounds in runs.items()}
    finally:
        cluster.stop()
    (rawdir / "sizing.json").write_text(json.dumps(data, indent=1))
    report(data, outdir)
    log(f"wrote {outdir / 'SIZING.md'}")
    return 0


def prepare(cluster: PgCluster) -> None:
    """The shop database, migrated (this package's tables too) and seeded, as bench/run.py
    makes it."""
    cluster.execute(f"CREATE ROLE {DB_USER} LOGIN")
    cluster.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
    env = django_env(database("pooled-request", cluster, 1, 5.0, None))
    for command in (["migrate", "--noinput", "-v", "0"], ["seed_shop"]):
        subprocess.run([sys.executable, str(TESTPROJECT / "manage.py"), *command], env=env, check=True, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
