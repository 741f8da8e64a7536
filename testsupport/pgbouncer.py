"""A throwaway PgBouncer (transaction pooling) in front of a PgCluster, for tests and benchmarks.

Uses Debian's ``pgbouncer`` package (``apt-get install -y pgbouncer``); as root it runs the
daemon as the cluster's server user, since PgBouncer refuses to run as root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from .pgcluster import PgCluster
from .ports import free_port


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


class PgBouncer:
    """PgBouncer on 127.0.0.1 forwarding every database name to ``cluster``.

    ``settings`` adds or overrides lines of its ``[pgbouncer]`` section (the benchmark sets
    ``min_pool_size``, ``max_client_conn``, quieter logging); ``users`` may log in besides the
    cluster's user (trust); ``logdir``, if given, keeps a copy of its log after :meth:`stop`."""

    def __init__(
        self,
        cluster: PgCluster,
        pool_mode: str = "transaction",
        pool_size: int = 8,
        *,
        settings: dict[str, str] | None = None,
        logdir: Path | None = None,
        users: tuple[str, ...] = (),
    ) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed: apt-get install -y pgbouncer")
        self.binary = binary
        self.cluster = cluster
        self.port = free_port()
        self.host = "127.0.0.1"
        self.logdir = logdir
        self.dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.process: subprocess.Popen[bytes] | None = None
        options = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.dir / "users.txt"),
            "pool_mode": pool_mode,
            "default_pool_size": str(pool_size),
            "max_client_conn": "500",
            "server_reset_query": "DISCARD ALL",
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": str(self.dir / "pgbouncer.log"),
            "pidfile": str(self.dir / "pgbouncer.pid"),
            **(settings or {}),
        }
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n* = host={cluster.host} port={cluster.port}\n[pgbouncer]\n"
            + "".join(f"{key} = {value}\n" for key, value in options.items())
        )
        (self.dir / "users.txt").write_text("".join(f'"{user}" ""\n' for user in (cluster.user, *users)))

    def start(self, *, dbname: str = "postgres", user: str | None = None) -> PgBouncer:
        """Start it and wait until ``dbname`` answers through it (as ``user``, by default the
        cluster's)."""
        command = [self.binary, str(self.dir / "pgbouncer.ini")]
        run_as = self.cluster._owner  # the unprivileged user the cluster runs as, when root
        if run_as:
            shutil.chown(self.dir, run_as)
            for child in self.dir.iterdir():
                shutil.chown(child, run_as)
            command = ["runuser", "-u", run_as, "--", *command]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(
                    host=self.host, port=self.port, user=user or self.cluster.user, dbname=dbname, connect_timeout=2
                ):
                    return self
            except psycopg.OperationalError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.dir / "pgbouncer.log"
                    self.stop()
                    raise RuntimeError(
                        f"pgbouncer did not start: {exc}\n" + (log.read_text() if log.exists() else "")
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            # PgBouncer's safe shutdown, to its whole session: when root, the process started is
            # runuser, which ignores SIGINT (and never passed it on: every stop waited out the
            # 10 s below, then killed it).
            try:
                os.killpg(process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log = self.dir / "pgbouncer.log"
        if self.logdir is not None and log.exists():
            shutil.copy(log, self.logdir / f"pgbouncer-{self.port}.log")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
