"""Shared fixtures: a real embedded broker and real worker processes (no mocks of Kafka or Faust)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pytest

from stream_jobs.broker import EmbeddedBroker, free_port

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


class WorkerProcess:
    """``stormguard run`` in a child process, against a given broker."""

    def __init__(self, broker_url: str, tmp: Path, app_id: Optional[str] = None, env: Optional[dict] = None):
        self.broker_url = broker_url
        self.web_port = free_port()
        self.app_id = app_id or f"sg-test-{uuid.uuid4().hex[:8]}"
        self.tmp = tmp
        self.env = {**os.environ, "STORMGUARD_APP_ID": self.app_id, "STORMGUARD_DATA_DIR": str(tmp / "data"),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = tmp / f"worker-{self.app_id}-{self.web_port}.log"
        self.ready_after: Optional[float] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self, wait: bool = True, timeout: float = 60.0) -> "WorkerProcess":
        started = time.monotonic()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(STORMGUARD + ["run", "--broker", self.broker_url, "--web-port", str(self.web_port)],
                                     cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        if wait:
            self.wait_ready(timeout)
            self.ready_after = time.monotonic() - started
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_json(self.url + "/healthz", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log()}")

    def get(self, path: str) -> dict:
        status, body = http_json(self.url + path)
        assert status == 200, (status, body)
        return body

    def kill(self) -> None:
        """SIGKILL: no goodbye, no final commit."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(port=free_port()) as b:
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
    from stream_jobs.replay import make_producer, produce

    producer = make_producer(f"kafka://{bootstrap}")
    try:
        produce(lines, producer, topic=topic)
    finally:
        producer.close()
