"""Child processes the tools start — a worker, the bench's no-op agent, a deliverer, Prometheus.

One way to start them (own session, output to a log file), to wait until they
answer, and to stop them (SIGTERM to the whole group, then SIGKILL), used by
the demo, the bench, the local observability stack and the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Optional

from stream_jobs.kafka.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


class ProcessError(RuntimeError):
    """A child process exited, or did not become ready in time; the message ends with its log."""


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``GET url`` answers 200; False for any other answer or none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


class ChildProcess:
    """A command in its own session, its output appended to ``log_path``.

    ``web_port`` is where it serves HTTP, if it does: :meth:`wait_ready` then
    waits for ``GET /healthz`` to answer 200.
    """

    def __init__(self, cmd: list[str], log_path: Path, env: Optional[dict] = None,
                 web_port: Optional[int] = None, name: Optional[str] = None):
        self.cmd, self.log_path, self.env, self.web_port = cmd, Path(log_path), env, web_port
        self.name = name or Path(cmd[0]).name
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> "ChildProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self

    def wait_until(self, ready: Callable[[], bool], timeout: float = 60.0) -> float:
        """Poll ``ready`` until it is true; returns seconds since start. Raises if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")
            if ready():
                return time.monotonic() - self.started
            time.sleep(0.05)
        raise ProcessError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def wait_ready(self, timeout: float = 60.0) -> float:
        return self.wait_until(lambda: http_ok(self.url + "/healthz"), timeout)

    def kill(self) -> None:
        """SIGKILL the whole group: no goodbye, no final commit."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, chars: int = 5000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class WorkerProcess(ChildProcess):
    """``stormguard run --broker URL --web-port N`` with its own app id and data directory.

    ``env`` adds to (and overrides) this process's environment.
    """

    def __init__(self, broker_url: str, workdir: Path, app_id: Optional[str] = None,
                 env: Optional[dict] = None, web_port: Optional[int] = None):
        self.broker_url = broker_url
        self.app_id = app_id or f"sg-{uuid.uuid4().hex[:8]}"
        workdir = Path(workdir)
        port = web_port or free_port()
        full_env = {**os.environ, "STORMGUARD_APP_ID": self.app_id,
                    "STORMGUARD_DATA_DIR": str(workdir / f"data-{self.app_id}"), "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        super().__init__([sys.executable, "-m", "stream_jobs.cli", "run", "--broker", broker_url,
                          "--web-port", str(port)], workdir / f"worker-{self.app_id}-{port}.log", full_env,
                         web_port=port, name="the worker")

    @property
    def target(self) -> str:
        """``host:port`` of its HTTP endpoint, as Prometheus scrape configs want it."""
        return f"127.0.0.1:{self.web_port}"
