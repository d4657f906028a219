"""Shared fixtures: a real embedded broker and real worker processes (no mocks of Kafka or Faust)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest

from stream_jobs.worker import processes
from stream_jobs.kafka.broker import EmbeddedBroker
from stream_jobs.kafka.engines import ENGINES, make_broker

ROOT = Path(__file__).resolve().parents[1]
STORMGUARD = [sys.executable, "-m", "stream_jobs.cli"]


def wait_for(predicate, timeout: float = 45.0, what: str = "the condition", interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_json(url: str, method: str = "GET", body: Optional[dict] = None, token: Optional[str] = None,
              timeout: float = 5.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class WorkerProcess(processes.WorkerProcess):
    """``stormguard run`` against a given broker, with a JSON ``get`` for the tests."""

    ready_after: Optional[float] = None

    def start(self, wait: bool = True, timeout: float = 60.0) -> "WorkerProcess":
        super().start()
        if wait:
            self.ready_after = self.wait_ready(timeout)
        return self

    def get(self, path: str) -> dict:
        status, body = http_json(self.url + path)
        assert status == 200, (status, body)
        return body


def pytest_configure(config):
    config.addinivalue_line("markers", "both_brokers: the test runs on Apache Kafka and on Tansu "
                                       "(the broker fixture is parametrized: -k kafka / -k tansu picks one)")


def pytest_generate_tests(metafunc):
    if "broker" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_brokers"):
        metafunc.parametrize("broker", ENGINES, indirect=True)


@pytest.fixture
def broker(request, tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of its own for the test: Tansu, or each engine for a test marked ``both_brokers``.

    Apache Kafka keeps its data and log under the test's ``tmp_path`` (``kafka/broker.log``).
    """
    engine = getattr(request, "param", "tansu")
    b = make_broker(engine, data_dir=tmp_path / "kafka" if engine == "kafka" else None)
    with b:
        yield b


@pytest.fixture
def start_worker(tmp_path: Path):
    """Factory: ``start_worker(broker_url, **kw)`` starts a worker; all are stopped after the test."""
    workers: list[WorkerProcess] = []

    def _start(broker_url: str, wait: bool = True, **kw) -> WorkerProcess:
        w = WorkerProcess(broker_url, tmp_path, **kw).start(wait=wait)
        workers.append(w)
        return w

    yield _start
    for w in workers:
        w.stop()


def read_topic(bootstrap: str, topic: str, timeout: float = 5.0, until=None) -> list:
    """All records of a topic, by partition assignment (kafka-python groups get no assignment on Tansu)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False, group_id=None,
                             consumer_timeout_ms=300)
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while parts is None and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                time.sleep(0.1)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records = []
        while time.monotonic() < deadline:
            for msg in consumer:
                records.append(msg)
            if until is not None and until(records):
                break
            if until is None:
                end = consumer.end_offsets(tps)
                if all(consumer.position(tp) >= end[tp] for tp in tps):
                    break
        return records
    finally:
        consumer.close()


def produce_lines(bootstrap: str, lines: list[bytes], topic: str = "mail.events") -> None:
    from stream_jobs.kafka.replay import make_producer, produce

    producer = make_producer(f"kafka://{bootstrap}")
    try:
        produce(lines, producer, topic=topic)
    finally:
        producer.close()
