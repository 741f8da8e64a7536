"""The pool status page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against the demo site under gunicorn (3 workers publishing every 0.5 s).

A staff user with only ``view_poolsnapshot`` logs in through the admin's login form, opens the
page, sees one row per gunicorn worker, and watches the borrows total change under traffic
without a reload; a hostile ``application_name`` shows as text. The screenshot is saved to
build/admin-status.png; ``make screenshot`` makes it the README's picture, docs/admin-status.png.

What it needs it installs: ``chromium`` with apt-get when /usr/bin/chromium is missing (as
root), and ``playwright`` with pip into the running environment when it is not importable (it is
in the ``test`` extra). Playwright never downloads a browser here: it starts /usr/bin/chromium.
The test is skipped, saying why, only when Chromium cannot be installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from tests.servers import ROOT, WORKERS, get, join, live, running_fleet, traffic, wait_for

CHROMIUM = Path("/usr/bin/chromium")
#: Written under build/ (ignored by git), so `make test` changes no tracked file; `make screenshot`
#: copies it over docs/admin-status.png, the README's picture.
SCREENSHOT = ROOT / "build" / "admin-status.png"
#: The views and holders tables alone (docs/admin-views.png in the README).
VIEWS_SCREENSHOT = ROOT / "build" / "admin-views.png"
PAGE = "/admin/django_pooled_pg/poolsnapshot/"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
#: Whether the demo's history has a point in a 30 s bucket (the chart's step) that has ended.
COMPLETE_BUCKET = (
    "SELECT count(*) > 0 FROM django_pooled_pg_poolhistory WHERE alias = 'default' "
    "AND floor(extract(epoch FROM taken_at) / 30) < floor(extract(epoch FROM now()) / 30)"
)

pytestmark = [
    pytest.mark.slow,  # (a fleet under gunicorn and Chromium)
    pytest.mark.skipif(
        importlib.util.find_spec("gunicorn") is None,
        reason="gunicorn is not installed in this environment (pip install -e '.[test]')",
    ),
]


def ensure_chromium() -> None:
    """Install Debian's chromium if it is missing, or skip the test saying why it cannot be."""
    if CHROMIUM.exists():
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"{CHROMIUM} is missing and there is no apt-get to install it with")
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing; installing it needs root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.skip(f"chromium could not be installed ({' '.join(command)}: {' | '.join(tail)})")
    if not CHROMIUM.exists():
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} does not exist")


def ensure_playwright() -> None:
    """Playwright for Python (the driver only: it is never asked to download a browser)."""
    if importlib.util.find_spec("playwright") is not None:
        return
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "playwright"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"pip install playwright failed:\n{done.stdout}\n{done.stderr}"
    importlib.invalidate_caches()


@pytest.fixture
def fleet():
    ensure_chromium()
    ensure_playwright()
    with running_fleet({"POOLED_PG_POOL": '{"leak_timeout": 30}'}) as fleet:  # (stacks of holders)
        yield fleet


def test_status_page_in_chromium(fleet):
    from playwright.sync_api import sync_playwright

    # A staff user who may only view the pools (no other permission).
    fleet.manage(
        "shell",
        "-c",
        (
            "from django.contrib.auth.models import Permission, User\n"
            "u = User.objects.create_user('watcher', 'w@example.com', 'watch-the-pools', is_staff=True)\n"
            "u.user_permissions.add(Permission.objects.get(codename='view_poolsnapshot'))\n"
        ),
    )
    workers = wait_for(f"{WORKERS} workers", lambda: len(fleet.workers()) == WORKERS and fleet.workers())

    # Every worker serves some traffic and publishes it before the page opens.
    stop = threading.Event()
    clients = traffic(fleet.base, ["/shop/three/", "/shop/product/1/", "/shop/order/"], 8, stop)
    try:
        wait_for(
            "every worker to publish borrows",
            lambda: (
                (d := fleet.poolstats())
                and set(live(d)) == workers
                and all(p["counters"]["borrows"] > 0 for p in live(d).values())
            ),
        )
    finally:
        stop.set()
    join(clients)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "response",
                lambda r: (
                    r.status >= 400 and not r.url.endswith("/favicon.ico") and errors.append(f"{r.status} {r.url}")
                ),
            )

            # Log in through the admin's own form; it sends us on to the page.
            page.goto(f"{fleet.base}/admin/login/?next={PAGE}")
            page.fill("#id_username", "watcher")
            page.fill("#id_password", "watch-the-pools")
            page.click("input[type=submit]")
            page.wait_for_url(f"**{PAGE}")
            assert page.locator("h1").inner_text() == "Connection pools"
            assert "Connection pools" in page.locator(".breadcrumbs").inner_text()

            # One row per gunicorn worker.
            rows = page.locator("section[data-alias=default] tbody[data-rows=processes] tr:not(.dpp-stale)")
            pids = {int(key.rsplit(":", 1)[1]) for key in rows.evaluate_all("rs => rs.map(r => r.dataset.key)")}
            assert pids == workers
            assert page.locator("section[data-alias=default] svg.dpp-chart").count() == 2

            # Traffic, and the borrows total changes in place: no navigation, the marker survives.
            page.evaluate("window.__notReloaded = true")
            navigations: list[str] = []
            page.on("framenavigated", lambda frame: navigations.append(frame.url))
            borrows = page.locator("section[data-alias=default] [data-k='totals.borrows']")
            before = borrows.inner_text()

            # A connection that names itself like a pooled one, with markup in its "host".
            hostile = "dpp default <img src=x onerror=window.__xss=1>:4242"
            sneaky = psycopg.connect(dbname=fleet.dbname, application_name=hostile, autocommit=True, **fleet.server)
            stop = threading.Event()
            clients = traffic(
                fleet.base, ["/shop/three/", "/shop/product/1/", "/shop/order/", "/shop/slow/?s=0.3"], 12, stop
            )
            try:
                wait_for("the borrows total to change", lambda: borrows.inner_text() != before, timeout=30, every=0.5)
                after = borrows.inner_text()
                server_rows = page.locator("section[data-alias=default] tbody[data-rows='server.rows'] td")
                wait_for(
                    "the hostile connection in the server's view",
                    lambda: any("(not publishing)" in t for t in server_rows.all_inner_texts()),
                    timeout=30,
                    every=0.5,
                )
                assert "<img src=x onerror=window.__xss=1>:4242 (not publishing)" in server_rows.all_inner_texts()
                assert page.evaluate("window.__xss") is None
                assert page.evaluate("window.__notReloaded") is True and navigations == []
                assert int(after.replace(",", "")) > int(before.replace(",", ""))
                assert int(page.locator("#dpp-status").get_attribute("data-refreshed")) >= 1

                # Under traffic until the chart has a complete 30 s bucket (then reload for the
                # screenshot): a bucket of the fleet's history that has ended, by the server's clock.
                wait_for(
                    "a complete 30 s bucket in the fleet's history",
                    lambda: fleet.admin(COMPLETE_BUCKET, dbname=fleet.dbname)[0][0],
                    timeout=90,
                    every=1,
                )
            finally:
                stop.set()
                sneaky.close()
            join(clients)  # the slow requests finish
            # Which views held the pool, by their route names; and, during three slow requests in
            # a transaction, the connections checked out now, with the view and where it borrowed.
            views = page.locator("section[data-alias=default] tbody[data-rows=views] tr td:first-child")
            names = wait_for(
                "the views table", lambda: {"shop:three", "shop:slow"} <= set(views.all_inner_texts()) and views
            ).all_inner_texts()
            assert {"shop:three", "shop:product", "shop:order", "shop:slow"} <= set(names), names
            assert not [name for name in names if name.startswith("/")], names
            # (20 s: the checks below, each a browser round trip, can take a while on a busy machine)
            holding = [threading.Thread(target=get, args=(fleet.base + "/shop/slow/?s=20&tx=1", 60)) for _ in range(3)]
            for thread in holding:
                thread.start()
            holders = page.locator("section[data-alias=default] tbody[data-rows=holders] tr")

            def slow_holders() -> list[list[str]]:
                rows = [row.locator("td").all_inner_texts() for row in holders.all()]
                return [cells for cells in rows if len(cells) > 5 and cells[2] == "shop:slow"]

            wait_for("three holders on the page", lambda: len(slow_holders()) >= 3, timeout=30, every=0.5)
            page.reload()
            # The chart's in-use line is drawn: attached with a path, not "visible" (a flat line
            # has a bounding box 0 px high, which Playwright counts as hidden: CI once waited 30 s
            # for a line at a steady level).
            page.wait_for_selector("section[data-alias=default] path.dpp-line-in-use[d^=M]", state="attached")
            # (A row of a request still running its first statement reads "active": CI once caught
            # one 0.1 s into its hold. The one to check is a request in its wait.)
            waiting = wait_for(
                "a holder in its wait after the reload",
                lambda: [cells for cells in slow_holders() if cells[4] == "idle in transaction"],
                timeout=30,
                every=0.5,
            )
            cells = waiting[0]
            assert cells[4] == "idle in transaction", cells
            assert "views.py" in cells[5] and "in slow" in cells[5], cells
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert SCREENSHOT.stat().st_size > 10_000
            tables = page.locator("section[data-alias=default] .dpp-views-and-holders")
            tables.screenshot(path=str(VIEWS_SCREENSHOT))
            for thread in holding:
                thread.join()
            # The refresh line tells the time by the server's clock and zone, as "Updated" does.
            page.wait_for_function("Number(document.getElementById('dpp-status').dataset.refreshed) >= 1")
            updated = page.locator(".dpp-meta [data-k=taken_at]").inner_text()
            assert updated in page.locator("#dpp-state").inner_text()
            # A young fleet's chart spans its life, and its title says so.
            assert (
                page.locator("section[data-alias=default] h3[data-k='chart.span_title']").inner_text()
                == "The last 5 minutes"
            )

            # A phone's width: the tables scroll inside their boxes, nothing runs off the page.
            page.set_viewport_size({"width": 420, "height": 900})
            page.reload()
            page.wait_for_selector("section[data-alias=default] path.dpp-line-in-use[d^=M]", state="attached")
            overflow = page.evaluate("""() => {
                const root = document.getElementById("dpp-status");
                const loose = [...root.querySelectorAll("table")].filter(t => !t.closest(".dpp-scroll"));
                return {root: root.scrollWidth - root.clientWidth, loose: loose.length};
            }""")
            assert overflow == {"root": 0, "loose": 0}, overflow
            assert not errors, errors
        finally:
            browser.close()
