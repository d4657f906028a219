"""Produce a JSON-lines file of events to Kafka (``stormguard replay``).

Records are keyed by list address (the first, sorted), else by sender, so
every post to one list lands on one partition and stays in order there: that
is what lets several workers share the topic. Invalid records are produced
as they are, unkeyed, so the worker dead-letters them with a reason.
"""

from __future__ import annotations

import sys
import time
from typing import BinaryIO, Iterable, Iterator, Optional

import msgspec

from stream_jobs.settings import EVENTS_TOPIC


class ReplayError(RuntimeError):
    pass


class _Routing(msgspec.Struct):
    sender: str = ""
    lists: dict[str, int] = {}


_routing = msgspec.json.Decoder(_Routing)


def open_lines(path: str) -> BinaryIO:
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def read_records(fh: BinaryIO) -> Iterator[bytes]:
    """Non-blank lines, without their line ending: one record each."""
    for line in fh:
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield line


def routing_key(raw: bytes) -> Optional[bytes]:
    """The partition key of a record: its first list, else its sender, else none."""
    try:
        r = _routing.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None
    if r.lists:
        return min(r.lists).encode()
    return r.sender.encode() if r.sender else None


def bootstrap_servers(broker: Optional[str]) -> list[str]:
    """``kafka://a:9092;kafka://b:9092`` (Faust's form) as kafka-python's list."""
    import os

    url = broker or os.environ.get("STORMGUARD_BROKER") or "kafka://127.0.0.1:9092"
    servers = []
    for part in url.replace(",", ";").split(";"):
        part = part.strip()
        if part:
            servers.append(part.split("://", 1)[-1])
    if not servers:
        raise ReplayError(f"no broker address in {url!r}")
    return servers


def kafka_security() -> dict:
    """TLS/SASL options for kafka-python, from the worker's STORMGUARD_KAFKA_* settings."""
    from stream_jobs.settings import WorkerSettings

    return WorkerSettings.from_env().kafka_python_options()


def make_producer(broker: Optional[str], **config):
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from stream_jobs.kafka.preflight import BrokerUnreachable, check_brokers

    servers = bootstrap_servers(broker)
    try:
        check_brokers(servers)  # a wrong password or CA says so at once, not as "no broker answers" in 10 s
    except BrokerUnreachable as exc:
        raise ReplayError(str(exc)) from None
    try:
        config.setdefault("bootstrap_timeout_ms", 10_000)
        return KafkaProducer(bootstrap_servers=servers, linger_ms=5, acks=1, **kafka_security(), **config)
    except KafkaError:
        raise ReplayError(f"no Kafka broker answers at {','.join(servers)}; "
                          "start one with `stormguard broker` or pass --broker") from None


def produce(records: Iterable[bytes], producer, topic: str = EVENTS_TOPIC, rate: float = 0.0,
            progress=None) -> int:
    """Send records in order (at ``rate`` per second if > 0); returns how many were sent."""
    n = 0
    start = time.monotonic()
    for raw in records:
        if rate > 0:
            due = start + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        producer.send(topic, value=raw, key=routing_key(raw))
        n += 1
        if progress is not None:
            progress.update(1)
    producer.flush()
    return n


def replay_file(path: str, broker: Optional[str] = None, rate: float = 0.0, topic: str = EVENTS_TOPIC,
                progress: bool = True) -> int:
    from tqdm import tqdm

    total = None
    if path != "-":
        with open(path, "rb") as fh:
            total = sum(1 for line in fh if line.strip())
    producer = make_producer(broker)
    try:
        with open_lines(path) as fh, tqdm(total=total, unit="ev", desc=f"replay → {topic}",
                                          disable=not progress, file=sys.stderr) as bar:
            return produce(read_records(fh), producer, topic=topic, rate=rate, progress=bar)
    finally:
        producer.close()
