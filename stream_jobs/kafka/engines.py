"""The broker engines by name: ``stormguard broker --engine kafka|tansu`` and the tests' ``broker`` fixture."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Optional

from stream_jobs.kafka.apache import KafkaBroker
from stream_jobs.kafka.broker import BrokerError, EmbeddedBroker, free_port

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


