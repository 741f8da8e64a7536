"""gunicorn serving the demo shop (testproject/), as the tests (tests/servers.py), the demo
(testproject/demo.py) and the benchmark (bench/run.py) start it: the command line, waiting until
it answers, and stopping it with whatever it left behind. Each caller picks the workers, the
extra options and where the output goes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from testsupport.ports import HOST, free_port

TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"


def no_control_socket() -> list[str]:
    """Recent gunicorn opens a control socket at one fixed path per user, which a second server
    (a test beside the demo, a ``--check`` while the demo runs) would fight over; none of ours
    uses it."""
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return []
    return ["--no-control-socket"] if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS) else []


class Gunicorn:
    """``testproject.wsgi`` under gunicorn (gthread) on 127.0.0.1, in a session of its own: signals
    of the terminal reach its caller, which stops it in order, and :meth:`stop` kills whatever
    is left in that session (a worker whose master died)."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        port: int = 0,
        workers: int = 3,
        threads: int = 8,
        options: Sequence[str] = (),
    ) -> None:
        self.env = env
        self.port = port or free_port()
        self.workers = workers
        self.threads = threads
        self.options = list(options)
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn", "testproject.wsgi:application",
            "--chdir", str(TESTPROJECT), "--worker-class", "gthread",
            "--workers", str(self.workers), "--threads", str(self.threads),
            "--bind", f"{HOST}:{self.port}", *self.options, *no_control_socket(),
        ]  # fmt: skip

    def start(self, stdout: int | IO[Any] | None = None, **popen: Any) -> None:
        """Start it. ``stdout``: where its output goes (``subprocess.PIPE``: kept, as text, for
        :meth:`stop` to return; a file; None: this process's); ``popen``: more of Popen's
        arguments."""
        if stdout == subprocess.PIPE:
            popen.setdefault("text", True)
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env,
            cwd=TESTPROJECT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,
            **popen,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(
        self, path: str = "/", *, cookie: str | None = None, timeout: float = 60, request_timeout: float = 10
    ) -> None:
        """Wait until ``path`` answers 200 without a redirect; RuntimeError if gunicorn exits
        first (with its output when :meth:`start` kept it) or ``timeout`` passes."""
        deadline, last = time.monotonic() + timeout, "no answer"
        request = urllib.request.Request(self.base + path, headers={"Cookie": cookie} if cookie else {})
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                output = self.proc.stdout.read() if self.proc is not None and self.proc.stdout else ""
                raise RuntimeError(f"gunicorn exited before it served {path}\n{output}".rstrip())
            try:
                with urllib.request.urlopen(request, timeout=request_timeout) as resp:
                    if resp.geturl() != request.full_url:  # (the admin's login page, say)
                        raise RuntimeError(f"{request.full_url} redirected to {resp.geturl()}")
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn not ready on {self.base}{path} within {timeout:.0f} s: {last}")

    def stop(self, timeout: float = 15, on_timeout: Callable[[], None] | None = None) -> str:
        """SIGTERM (gunicorn finishes the requests in flight), ``timeout`` seconds for it to
        exit, then SIGKILL to all of its session. Its output if :meth:`start` kept it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        output, done = None, False
        try:
            output, _ = proc.communicate(timeout=timeout)
            done = True
        except subprocess.TimeoutExpired:
            if on_timeout is not None:
                on_timeout()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not done:
            output, _ = proc.communicate()
        return output or ""
