"""Which view holds the pool, across a real fleet: the demo site under gunicorn (3 workers, each
publishing every 0.5 s), three views of very different hold times under concurrent load, read
back by ``manage.py poolstats --views`` / ``--holders`` in another process; both release modes."""

from __future__ import annotations

import importlib.util
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.servers import get, running_fleet, wait_for

pytestmark = [
    pytest.mark.slow,  # (a fleet under gunicorn)
    pytest.mark.skipif(
        importlib.util.find_spec("gunicorn") is None,
        reason="gunicorn is not installed in this environment (pip install -e '.[test]')",
    ),
]

SLOW, THREE, PRODUCT = "shop:slow", "shop:three", "shop:product"
#: Requests sent per view, and the statements each makes (a borrow each with release="transaction",
#: except inside the slow view's transaction, which holds one connection through its sleep).
SENT = {SLOW: 10, THREE: 60, PRODUCT: 20}
STATEMENTS = {SLOW: 1, THREE: 3, PRODUCT: 1}
BURST = 4
PATHS = {SLOW: "/shop/slow/?s=0.3&tx=1", THREE: "/shop/three/", PRODUCT: "/shop/product/1/"}


def by_total(fleet) -> dict[str, dict]:
    data = fleet.poolstats()["aliases"]["default"]["views"]
    return {v["view"]: v for v in data["by_total"]}


@pytest.fixture(params=["request", "transaction"])
def fleet(request):
    pool = {"release": request.param, "leak_timeout": 30}  # (leak_timeout: borrowers' stacks)
    with running_fleet({"POOLED_PG_POOL": json.dumps(pool)}) as fleet:
        fleet.release = request.param
        yield fleet


def test_views_ranked_by_connection_seconds_and_holders_listed(fleet):
    # (what gunicorn's readiness requests to /shop/three/ borrowed, once published)
    wait_for("the readiness requests to be published", lambda: THREE in by_total(fleet))
    # ...all of them: the counts read the same twice, a publication interval (0.5 s) apart at least.
    reads: list[dict] = []

    def settled() -> dict | None:
        reads.append(by_total(fleet))
        return reads[-1] if len(reads) > 1 and reads[-1] == reads[-2] else None

    before = wait_for("the published counts to settle", settled, every=0.6)
    sent = [view for view, n in SENT.items() for _ in range(n)]
    random.Random(17).shuffle(sent)  # interleaved, not in blocks
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda view: get(fleet.base + PATHS[view]), sent))
    assert statuses == [200] * len(sent)

    # A borrow per request; with release="transaction" a borrow per statement, or fewer where
    # one could not go back before the next (a cursor still open): three's count is a range then.
    low = dict(SENT)
    high = {view: n * STATEMENTS[view] for view, n in SENT.items()} if fleet.release == "transaction" else low

    def counted() -> dict[str, int]:
        now = by_total(fleet)
        return {
            view: now.get(view, {}).get("total", {}).get("borrows", 0)
            - before.get(view, {}).get("total", {}).get("borrows", 0)
            for view in SENT
        }

    seen: list[dict[str, int]] = []

    def published() -> bool:  # every count as expected, or the same for the last 3 reads
        seen.append(counted())
        return seen[-1] == high or (len(seen) > 3 and seen[-1] == seen[-2] == seen[-3])

    wait_for(f"every worker to publish {high}", published, timeout=30, every=0.5)
    assert all(low[view] <= seen[-1][view] <= high[view] for view in SENT), (seen[-1], low, high)
    assert seen[-1][SLOW] == SENT[SLOW] and seen[-1][PRODUCT] == SENT[PRODUCT]
    views = by_total(fleet)
    ranked = [name for name in views if name in SENT]
    assert ranked == [SLOW, THREE, PRODUCT], {name: views[name]["total"] for name in ranked}
    assert views[SLOW]["total"]["seconds"] >= 10 * 0.3
    assert views[SLOW]["hold"]["p50"] >= 0.25
    data = fleet.poolstats()["aliases"]["default"]["views"]
    recent = [v["view"] for v in data["by_recent"] if v["view"] in SENT]
    assert recent == [SLOW, THREE, PRODUCT]

    wide = {**fleet.env, "COLUMNS": "150"}  # (one block of columns: the README shows this output)
    report = fleet.manage("poolstats", "--views", env=wide).stdout
    print(report)
    lines = report.splitlines()
    since = lines.index("  since start:")
    block = lines[since + 2 : lines.index("", since)]
    rows = [line.split()[0] for line in block if line.split()[0] in SENT]
    assert rows == [SLOW, THREE, PRODUCT], report

    # --holders during a burst of slow requests: each is listed, with its view, its open
    # transaction and where it borrowed.
    # (10 s requests: each poolstats run is a process of its own, over a second on a loaded
    # machine. 4: gunicorn may hand them all to one worker, whose max_size is 4.)
    burst = [threading.Thread(target=get, args=(fleet.base + "/shop/slow/?s=10&tx=1", 40)) for _ in range(BURST)]
    for thread in burst:
        thread.start()

    def slow_holders() -> list[dict] | None:
        found = [h for h in fleet.poolstats()["aliases"]["default"]["holders"] if h["view"] == SLOW]
        return found if len(found) >= BURST and all(h["held"] >= 0.5 for h in found) else None

    try:
        holders = wait_for("the burst's connections published as held", slow_holders, timeout=8, every=0.1)
        report = fleet.manage("poolstats", "--holders", env=wide).stdout
    finally:
        for thread in burst:
            thread.join()
    print(report)
    assert len(holders) == BURST, holders
    assert all(h["state"] == "idle in transaction" for h in holders), holders
    assert all("views.py" in h["stack"] and "in slow" in h["stack"] for h in holders), holders[0]["stack"]
    assert report.count(SLOW) >= 2 * BURST, report  # a row and a stack heading each
