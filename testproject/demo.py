#!/usr/bin/env python
"""Run the demo shop under gunicorn on a private PostgreSQL, with a short burst of traffic.

    python testproject/demo.py [--datadir .pgdata-demo] [--port 8000] [--check]

Unless ``DATABASE_URL`` is set, a PostgreSQL cluster is started in ``--datadir`` (or the one
already running there is reused, and then left running), database ``shop`` is created, migrated
and seeded, and a superuser ``admin`` gets a random password, kept in the datadir so that every
run prints the same one. Then gunicorn serves the site (gthread, 3 workers x 8 threads) until
Ctrl-C, which stops gunicorn and the cluster this script started.

``--check`` starts everything, requests each view once, stops everything, and exits 0 when every
answer was right, 1 otherwise.

Needs only the standard library, the repository's ``testsupport.pgcluster`` and, in the running
environment, Django, this package and gunicorn (``pip install -e '.[demo]'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent  # testproject/
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # testsupport

from testsupport.gunicorn import Gunicorn  # noqa: E402

HOST = "127.0.0.1"
DB_NAME = "shop"
ADMIN = "admin"


class Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _on_signal(signum: int, frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def _while_stopping(signum: int, frame: object) -> None:
    print("demo: still stopping, one moment...", file=sys.stderr, flush=True)


def say(message: str = "") -> None:
    print(message, flush=True)


# ----- Database ----------------------------------------------------------------------------------


class Database:
    """The database the demo uses: DATABASE_URL's, or one on a cluster in the datadir."""

    def __init__(self, datadir: Path) -> None:
        self.datadir = datadir
        self.cluster = None  # PgCluster when we manage one
        self.started = False  # whether this run started it (and so stops it)
        self.url = os.environ.get("DATABASE_URL", "")
        self.password_file = HERE / ".demo-admin-password"

    def start(self) -> None:
        if self.url:
            say(f"demo: using DATABASE_URL (database {self.url.rsplit('/', 1)[-1].split('?')[0]!r})")
            return
        from testsupport.pgcluster import PgCluster

        cluster = PgCluster(self.datadir)
        running = cluster.is_running()
        say(f"demo: {'reusing the' if running else 'starting a'} PostgreSQL cluster in {self.datadir}")
        self.cluster = cluster
        self.started = not running
        cluster.start(stop_at_exit=not running)
        cluster.create_database(DB_NAME)
        self.url = cluster.url(DB_NAME)
        self.password_file = cluster.datadir / "demo-admin-password"
        if running:
            say("demo: the cluster was running before: it is left running at exit")

    def stop(self) -> None:
        if self.cluster is not None and self.started:
            say("demo: stopping PostgreSQL")
            self.cluster.stop()
            self.started = False

    def admin_password(self) -> str:
        try:
            password = self.password_file.read_text().strip()
            if password:
                return password
        except FileNotFoundError:
            pass
        password = secrets.token_urlsafe(12)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        return password


ENSURE_ADMIN = """
import os
from django.contrib.auth import get_user_model
user, created = get_user_model().objects.get_or_create(username=os.environ["DEMO_ADMIN"])
password = os.environ["DEMO_ADMIN_PASSWORD"]
if created or not (user.is_active and user.is_staff and user.is_superuser) or not user.check_password(password):
    user.is_active = user.is_staff = user.is_superuser = True
    user.email = user.email or "admin@example.com"
    user.set_password(password)
    user.save()
    print("demo: superuser", user.username, "created" if created else "updated")
"""


def manage(env: dict[str, str], *args: str) -> None:
    say(f"demo: manage.py {' '.join(args[:1] if args[0] == 'shell' else args)}")
    subprocess.run([sys.executable, str(HERE / "manage.py"), *args], env=env, check=True, cwd=ROOT)


# ----- gunicorn --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the demo dies without cleaning up (e.g. SIGKILL). Linux only."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


class Server(Gunicorn):
    """The demo's gunicorn (testsupport/gunicorn.py): its log on this terminal, gone if the demo
    dies; terminal signals reach the demo, which stops it in order."""

    def __init__(self, env: dict[str, str], port: int, access_log: bool) -> None:
        options = ["--graceful-timeout", "10", *(["--access-logfile", "-"] if access_log else [])]
        super().__init__(env, port=port, workers=3, threads=8, options=options)

    def start(self) -> None:
        say(f"demo: starting gunicorn on {self.base} (gthread, 3 workers x 8 threads)")
        super().start(preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def wait_ready(self) -> None:
        super().wait_ready("/", timeout=60, request_timeout=5)

    def stop(self) -> None:
        if self.alive():
            say("demo: stopping gunicorn")  # graceful: finish requests in flight
        super().stop(timeout=20, on_timeout=lambda: say("demo: gunicorn did not stop in 20 s: killing it"))


# ----- Requests ----------------------------------------------------------------------------------


def fetch(url: str, method: str = "GET", timeout: float = 15) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one request; status 0 when no HTTP answer came."""
    started = time.perf_counter()
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.perf_counter() - started
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc).encode(), time.perf_counter() - started


def first_product_id(base: str) -> int:
    status, body, _ = fetch(base + "/shop/export.csv")
    if status == 200:
        lines = body.decode().splitlines()
        if len(lines) > 1:
            return int(lines[1].split(",")[0])
    return 1


def check(base: str, password: str) -> bool:
    """Request each view once; True when all answered as expected."""
    pid = first_product_id(base)
    expected = [
        ("GET", "/", 200),
        ("GET", f"/shop/product/{pid}/", 200),
        ("GET", "/shop/three/", 200),
        ("GET", "/shop/slow/", 200),
        ("GET", "/shop/order/", 200),
        ("POST", "/shop/order/", 201),
        ("GET", "/shop/export.csv", 200),
        ("GET", "/shop/async/", 200),
        ("GET", "/shop/listings/", 200),
        ("GET", "/admin/login/", 200),
        ("GET", "/static/admin/css/base.css", 200),
    ]
    ok = True
    for method, path, want in expected:
        status, body, seconds = fetch(base + path, method)
        good = status == want
        if path == "/" and good:  # the home page links to the pool status page
            good = b"/admin/django_pooled_pg/poolsnapshot/" in body and b"arrives with" not in body
        if path == "/shop/export.csv" and good:
            rows = body.decode().count("\n") - 1
            good = rows >= 200
            path += f" ({rows} rows)"
        ok &= good
        detail = "" if good else f"  expected {want}: {body[:300].decode(errors='replace')!r}"
        say(f"demo: check {'ok  ' if good else 'FAIL'} {status} {method:4} {path} {seconds * 1000:.0f} ms{detail}")
    good = admin_login(base, password)
    say(f"demo: check {'ok  ' if good else 'FAIL'} admin login as {ADMIN!r}")
    return ok and good


def admin_login(base: str, password: str) -> bool:
    """Log in to the admin as the superuser (CSRF token and session cookie) and open its index."""
    import http.cookiejar
    import re
    from urllib.parse import urlencode

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        with opener.open(base + "/admin/login/?next=/admin/", timeout=15) as resp:
            token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', resp.read())
        if token is None:
            return False
        form = {
            "csrfmiddlewaretoken": token.group(1).decode(),
            "username": ADMIN,
            "password": password,
            "next": "/admin/",
        }
        req = urllib.request.Request(
            base + "/admin/login/?next=/admin/",
            data=urlencode(form).encode(),
            headers={"Referer": base + "/admin/login/"},
        )
        with opener.open(req, timeout=15) as resp:  # follows the redirect to /admin/
            return resp.status == 200 and resp.url.rstrip("/").endswith("/admin") and b"Log out" in resp.read()
    except (urllib.error.URLError, OSError):
        return False


def burst(base: str, seconds: float, threads: int) -> None:
    """A few threads hitting the views for ``seconds``; prints counts and latencies per view."""
    pid = first_product_id(base)
    paths = [
        ("GET", f"/shop/product/{pid}/"), ("GET", "/shop/three/"), ("GET", "/shop/slow/"),
        ("POST", "/shop/order/"), ("GET", "/shop/async/"), ("GET", "/shop/three/"),
        ("GET", f"/shop/product/{pid + 1}/"), ("GET", "/shop/slow/"), ("GET", "/shop/export.csv"),
    ]  # fmt: skip
    results: dict[str, list[tuple[int, float]]] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def work(offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            method, path = paths[i % len(paths)]
            i += 1
            status, _, took = fetch(base + path, method, timeout=10)
            key = path if not path.startswith("/shop/product/") else "/shop/product/<id>/"
            with lock:
                results.setdefault(f"{method} {key}", []).append((status, took))

    say(f"demo: sending traffic for {seconds:g} s from {threads} threads")
    workers = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 15)
    with lock:
        snapshot = {k: list(v) for k, v in results.items()}
    total = sum(len(v) for v in snapshot.values())
    say(f"demo: {total} requests ({total / seconds:.0f}/s)")
    say(f"  {'view':32} {'requests':>8} {'errors':>6} {'median ms':>9} {'max ms':>7}")
    for key in sorted(snapshot):
        rows = snapshot[key]
        errors = sum(1 for status, _ in rows if not 200 <= status < 300)
        times = [t * 1000 for _, t in rows]
        say(f"  {key:32} {len(rows):8} {errors:6} {statistics.median(times):9.1f} {max(times):7.1f}")


# ----- Main --------------------------------------------------------------------------------------


def display_python() -> str:
    """The interpreter running this, as a path relative to the working directory if it is below it."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datadir", default=str(ROOT / ".pgdata-demo"), help="PostgreSQL data directory")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000; a free one with --check)")
    parser.add_argument("--check", action="store_true", help="request each view once, stop, exit 0 or 1")
    parser.add_argument("--traffic", type=float, default=5.0, help="seconds of traffic at start (0: none)")
    parser.add_argument("--traffic-threads", type=int, default=6)
    parser.add_argument("--access-log", action="store_true", help="gunicorn's access log to stdout")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("gunicorn") is None:
        print(
            f"demo: gunicorn is not installed in {sys.prefix}; install the demo extra: "
            f"{display_python()} -m pip install -e '.[demo]' (or run `make demo`)",
            file=sys.stderr,
        )
        return 2
    from testsupport.ports import free_port

    port = args.port or (free_port() if args.check else 8000)
    if not port_is_free(port):
        print(f"demo: port {port} on {HOST} is in use (another demo running?); pick one with --port", file=sys.stderr)
        return 2

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    db = Database(Path(args.datadir).absolute())
    server: Server | None = None
    try:
        db.start()
        env = {
            **os.environ,
            "DATABASE_URL": db.url,
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
            "PYTHONUNBUFFERED": "1",
        }
        manage(env, "migrate", "--noinput", "-v", "1")
        manage(env, "seed_shop")
        password = db.admin_password()
        manage({**env, "DEMO_ADMIN": ADMIN, "DEMO_ADMIN_PASSWORD": password}, "shell", "-v", "0", "-c", ENSURE_ADMIN)

        server = Server(env, port, args.access_log)
        server.start()
        server.wait_ready()

        if args.check:
            ok = check(server.base, password)
            say(f"demo: check {'passed' if ok else 'FAILED'}")
            return 0 if ok else 1

        if args.traffic > 0:
            burst(server.base, args.traffic, args.traffic_threads)
        python = display_python()
        say()
        say(f"  The shop:      {server.base}/")
        say(f"  The admin:     {server.base}/admin/   user {ADMIN}, password {password}")
        say(f"  Pool page:     {server.base}/admin/django_pooled_pg/poolsnapshot/   (log in as above)")
        say(f"  Pool stats:    DATABASE_URL={db.url} {python} testproject/manage.py poolstats")
        say(f"  Load it:       wrk -t4 -c32 -d10s {server.base}/shop/three/   (also /shop/slow/, /shop/order/ ...)")
        say(f"  Database:      {db.url}")
        say()
        say("demo: serving; press Ctrl-C to stop gunicorn" + (" and PostgreSQL" if db.started else ""))
        while server.alive():
            time.sleep(0.5)
        print("demo: gunicorn exited on its own (see its log above)", file=sys.stderr)
        return 1
    except Stop as stop:
        say(f"\ndemo: {stop} received")
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"demo: {' '.join(map(str, exc.cmd[:4]))}... failed with exit status {exc.returncode}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, _while_stopping)
        signal.signal(signal.SIGTERM, _while_stopping)
        try:
            if server is not None:
                server.stop()
        finally:
            db.stop()
        say("demo: stopped")


if __name__ == "__main__":
    sys.exit(main())
