"""The demo site: ``testproject/demo.py --check`` starts a cluster, gunicorn and requests every view."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,  # (the demo: a cluster and gunicorn of its own)
    pytest.mark.skipif(
        importlib.util.find_spec("gunicorn") is None,
        reason="gunicorn is not installed in this environment (pip install -e '.[test]' or '.[demo]')",
    ),
]


def test_demo_check(tmp_path):
    datadir = tmp_path / "pgdata"
    # The demo starts its own cluster in datadir; it must not seed a server DATABASE_URL names,
    # nor inherit the test settings.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "testproject" / "demo.py"), "--check", "--datadir", str(datadir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # let it stop gunicorn and its cluster
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"demo.py --check did not finish in 240 s:\n{output}")
    finally:
        _stop_leftover_cluster(datadir)
    assert proc.returncode == 0, f"demo.py --check failed ({proc.returncode}):\n{output}"
    assert "demo: check passed" in output, output


def _stop_leftover_cluster(datadir: Path) -> None:
    """Never leave a server behind, and remove the datadir's real location (maybe under /tmp)."""
    if not datadir.exists():
        return
    from testsupport.pgcluster import PgCluster

    PgCluster(datadir).stop()
    real = datadir.resolve()
    if real != datadir.absolute():
        shutil.rmtree(real, ignore_errors=True)
