"""What filling the OpenTelemetry histograms costs the collecting thread, per duration.

``django_pooled_pg.opentelemetry`` records, at each collection, every wait and hold since the
last one (the API's ``Histogram.record()`` takes one value per call). This replays ``--n``
borrows (a wait and a hold each, log-normal around 17 us and 1 ms) into the package's histograms
and times ``PoolMetrics._record`` on a snapshot of them, with the SDK's in-memory reader. No
database is needed.

    python bench/otel_cost.py [--n 60000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60_000, help="borrows per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from django.conf import settings

    settings.configure()
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from django_pooled_pg.opentelemetry import PoolMetrics
    from django_pooled_pg.pooling.stats import AliasStats
    from django_pooled_pg.telemetry.snapshot import PoolSnapshot

    reader = InMemoryMetricReader()
    metrics = PoolMetrics(MeterProvider(metric_readers=[reader]).get_meter("bench"))
    stats = AliasStats()
    view = stats.view("bench")  # (waits and holds are recorded per view; the alias's are their sums)
    for _ in range(args.rounds):
        for _ in range(args.n):
            view.wait.record(random.lognormvariate(-11, 1.5))
            view.hold.record(random.lognormvariate(-7, 1))
        pool = PoolSnapshot(
            host="bench", pid=0, alias="default", started_at=0.0, taken_at=0.0, database="", server="",
            application_name="", own_application_name=False, min_size=2, max_size=10, timeout=10.0, size=2,
            idle=2, in_use=0, waiting=0, leaked_now=0, wait=stats.wait.to_dict(), hold=stats.hold.to_dict(),
        )  # fmt: skip
        started = time.perf_counter()
        metrics._record(pool)
        elapsed = time.perf_counter() - started
        print(
            f"Python {sys.version.split()[0]}: {2 * args.n} durations in {elapsed * 1000:.0f} ms, "
            f"{elapsed / (2 * args.n) * 1e6:.2f} us each"
        )
    started = time.perf_counter()
    reader.get_metrics_data()
    print(f"the collection after: {(time.perf_counter() - started) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
