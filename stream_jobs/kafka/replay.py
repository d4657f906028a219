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


class Refusals:
    """Records a producer could not deliver, each said once on stderr, and counted.

    A record the broker refuses (over its ``message.max.bytes``: ``MESSAGE_SIZE_TOO_LARGE``) or the
    client refuses (over ``max_request_size``) is reported when its answer comes, naming the record
    and its size; the others go on. ``prefix`` starts each line (``stormguard replay``).

    >>> r = Refusals("stormguard replay")
    >>> r.refused("record 3", 2_000_000, Exception("MessageSizeTooLargeError"))  # doctest: +ELLIPSIS
    >>> r.count, r.first
    (1, 'record 3 (2,000,000 bytes): larger than the broker accepts (its message.max.bytes)...')
    """

    def __init__(self, prefix: str, out=None):
        self.prefix = prefix
        self.out = out
        self.count = 0
        self.first: Optional[str] = None

    def send(self, producer, topic: str, raw: bytes, key: Optional[bytes], label: str) -> None:
        from kafka.errors import KafkaError

        try:
            future = producer.send(topic, value=raw, key=key)
        except KafkaError as exc:  # refused before it left: over the client's max_request_size
            self.refused(label, len(raw), exc)
            return
        future.add_errback(lambda exc: self.refused(label, len(raw), exc))

    def refused(self, label: str, size: int, exc: BaseException) -> None:
        name = type(exc).__name__ + " " + str(exc)
        if "TooLarge" in name or "TOO_LARGE" in name:
            why = ("larger than the broker accepts (its message.max.bytes); the record was not produced. Split "
                   "it, or raise message.max.bytes on the brokers (and max.message.bytes on the topic)")
        else:
            why = f"not produced: {type(exc).__name__}: {exc}"
        line = f"{label} ({size:,} bytes): {why}"
        self.count += 1
        if self.first is None:
            self.first = line
        if self.prefix:
            print(f"{self.prefix}: {line}", file=self.out or sys.stderr, flush=True)


def produce(records: Iterable[bytes], producer, topic: str = EVENTS_TOPIC, rate: float = 0.0,
            progress=None, refusals: Optional[Refusals] = None) -> int:
    """Send records in order (at ``rate`` per second if > 0); returns how many were sent.

    Every record's delivery is checked: those the broker refused are reported by ``refusals``
    (default: a :class:`ReplayError` once all were sent, naming the first and how many).
    """
    check = refusals or Refusals("")
    n = 0
    start = time.monotonic()
    for raw in records:
        if rate > 0:
            due = start + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        n += 1
        check.send(producer, topic, raw, routing_key(raw), f"record {n}")
        if progress is not None:
            progress.update(1)
    producer.flush()
    if refusals is None and check.count:
        raise ReplayError(f"{check.count} of {n} records refused; the first: {check.first}")
    return n


def replay_file(path: str, broker: Optional[str] = None, rate: float = 0.0, topic: str = EVENTS_TOPIC,
                progress: bool = True) -> int:
    from tqdm import tqdm

    total = None
    if path != "-":
        with open(path, "rb") as fh:
            total = sum(1 for line in fh if line.strip())
    producer = make_producer(broker)
    refusals = Refusals("stormguard replay")
    try:
        with open_lines(path) as fh, tqdm(total=total, unit="ev", desc=f"replay → {topic}",
                                          disable=not progress, file=sys.stderr) as bar:
            n = produce(read_records(fh), producer, topic=topic, rate=rate, progress=bar, refusals=refusals)
    finally:
        producer.close()
    if refusals.count:
        raise ReplayError(f"{refusals.count} of {n} records refused by the broker and not produced "
                          f"(the first: {refusals.first})")
    return n
