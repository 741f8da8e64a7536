"""Where the machine's CPU goes per request under ``make bench``'s load: the gunicorn workers
(user and kernel), PostgreSQL, wrk, and the time no one ran (idle).

``bench/run.py --perf`` reads the workers' and the server's CPU from ``/proc``; this samples
every CPU with ``perf record -a`` instead (Debian's ``perf``), so the idle time is counted too.
On 2 cores shared by the workers, the server and wrk, a mode whose requests leave the CPU idle
more often serves fewer of them even when it runs no more instructions. Each mode runs
``bench/run.py`` alone (one endpoint, one round), modes alternating over the rounds; the
figures are µs of one CPU per request (samples x sampling period / requests), median and range.

    python bench/cpu_split.py [--modes django-pool,pooled-request,pooled-noreset] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREQUENCY = 1999  # samples per second per CPU
PARTS = ("workers-user", "workers-kernel", "postgres", "wrk", "idle")
WARMUP = 2  # seconds of wrk's load before each measured run (bench/run.py --warmup)


def sample(mode: str, endpoint: str, duration: int, out: Path) -> dict[str, float]:
    """One run of ``mode`` under ``perf record -a``: µs of CPU per request by part, and req/s."""
    data = out / f"{mode}.data"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--modes", mode, "--endpoints", endpoint, "--rounds", "1",
           "--duration", str(duration), "--warmup", str(WARMUP), "--skip-overload", "--skip-autoscale", "--skip-micro", "--skip-contended",
           "--output", str(out / mode)]  # fmt: skip
    subprocess.run(["perf", "record", "-a", "-q", "-F", str(FREQUENCY), "-o", str(data), "--", *cmd],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "comm,dso", "-n", "--stdio"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    counts = dict.fromkeys(PARTS, 0)
    for line in report.splitlines():
        m = re.match(r"\s+[\d.]+%\s+(\d+)\s+(\S+)\s+(\S+)", line)
        if not m:
            continue
        n, comm, dso = int(m.group(1)), m.group(2), m.group(3)
        # (gunicorn's workers are "python"; so is run.py, which mostly sleeps)
        part = {"python": "workers-kernel" if "kernel" in dso else "workers-user", "postgres": "postgres",
                "wrk": "wrk", "swapper": "idle"}.get(comm)  # fmt: skip
        if part:
            counts[part] += n
    raw = max((out / mode / "raw").glob("bench-*.json"))  # (this run's: the newest)
    result = json.loads(raw.read_text())["main"][mode][endpoint]
    # Requests over the whole sampled run: the warm-up ran at about the measured rate.
    requests = result["rps"] * (duration + WARMUP)
    per_request = {part: n * 1e6 / FREQUENCY / requests for part, n in counts.items()}
    return {**per_request, "req/s": result["rps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="django-pool,pooled-request,pooled-noreset")
    parser.add_argument("--endpoint", default="product")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=16)
    args = parser.parse_args()
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for mode in modes:
                runs[mode].append(sample(mode, args.endpoint, args.duration, Path(tmp)))
                print(f"round {i + 1} {mode}: " + ", ".join(f"{k} {v:.0f}" for k, v in runs[mode][-1].items()),
                      flush=True)  # fmt: skip
    print(f"\nCPU µs per request, median (range) of {args.rounds} rounds; {args.endpoint}, 2 workers x 16 threads")
    print("| mode | req/s | " + " | ".join(PARTS) + " |")
    print("|---|" + "---:|" * (len(PARTS) + 1))
    for mode, rows in runs.items():
        cells = []
        for key in ("req/s", *PARTS):
            values = [row[key] for row in rows]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
