"""A throwaway PgBouncer (transaction pooling) in front of a PgCluster, for tests and benchmarks.

Uses Debian's ``pgbouncer`` package (``apt-get install -y pgbouncer``); as root it runs the
daemon as the cluster's server user, since PgBouncer refuses to run as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from .pgcluster import PgCluster


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgBouncer:
    """PgBouncer on 127.0.0.1 forwarding every database name to ``cluster``."""

    def __init__(self, cluster: PgCluster, pool_mode: str = "transaction", pool_size: int = 8) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed: apt-get install -y pgbouncer")
        self.binary = binary
        self.cluster = cluster
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.process: subprocess.Popen[bytes] | None = None
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={cluster.host} port={cluster.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir =\nauth_type = trust\nauth_file = {self.dir / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n"
            "server_reset_query = DISCARD ALL\nignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
        )
        (self.dir / "users.txt").write_text(f'"{cluster.user}" ""\n')

    def start(self) -> PgBouncer:
        command = [self.binary, str(self.dir / "pgbouncer.ini")]
        run_as = self.cluster._owner  # the unprivileged user the cluster runs as, when root
        if run_as:
            shutil.chown(self.dir, run_as)
            for child in self.dir.iterdir():
                shutil.chown(child, run_as)
            command = ["runuser", "-u", run_as, "--", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(
                    host=self.host, port=self.port, user=self.cluster.user, dbname="postgres", connect_timeout=2
                ):
                    return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.dir / "pgbouncer.log"
                    raise RuntimeError(
                        "pgbouncer did not start:\n" + (log.read_text() if log.exists() else "")
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
