"""The observability stack on one machine, without Docker: broker, workers, a real Prometheus.

Used by the live dashboard test (tests/deploy/test_prometheus_live.py) and by
``deploy/grafana/render_preview.py`` (the picture in docs/dashboard.png):

* :class:`Prometheus` runs the Debian ``prometheus`` binary on a free loopback
  port with a generated scrape config, and answers PromQL through its HTTP API;
* :class:`Worker` runs ``stormguard run`` in a child process;
* :func:`storm_events` makes a small NHSmail-shaped stream around "now": quiet
  background traffic, a few ordinary lists, then a test message to an
  840,000-member list and a reply-all storm.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from stream_jobs.kafka.broker import free_port
from stream_jobs.worker.processes import ChildProcess, WorkerProcess, http_ok

STORM_LIST = "all@nhs.example"


class StackError(RuntimeError):
    pass


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
    if not path:
        raise StackError("no prometheus binary: install Debian's `prometheus` package (make install does)")
    return path


def scrape_config(targets: list[str], job: str = "stormguard", interval: str = "1s", rule_files: list[str] = (),
                  alertmanagers: list[str] = ()) -> str:
    """A prometheus.yml scraping ``targets`` (host:port) as ``job``; optionally rules and Alertmanagers."""
    doc = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                            "static_configs": [{"targets": list(targets)}]}],
    }
    if rule_files:
        doc["rule_files"] = [str(f) for f in rule_files]
    if alertmanagers:
        doc["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]}
    return json.dumps(doc, indent=2) + "\n"  # JSON is YAML


class Prometheus:
    """The real Prometheus server, on 127.0.0.1 and a free port, data in a temp dir."""

    def __init__(self, targets: list[str], workdir: Optional[Path] = None, interval: str = "1s",
                 rule_files: list[str] = (), alertmanagers: list[str] = ()):
        self.targets = targets
        self.interval = interval
        self.rule_files, self.alertmanagers = list(rule_files), list(alertmanagers)
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sg-prom-"))
        self.port = free_port()
        self.child: Optional[ChildProcess] = None
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Prometheus":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(scrape_config(self.targets, interval=self.interval, rule_files=self.rule_files,
                                                  alertmanagers=self.alertmanagers))
        self.child = ChildProcess(
            [prometheus_binary(), f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            self.log_path, name="prometheus").start()
        self.child.wait_until(lambda: http_ok(self.url + "/-/ready"), timeout)
        return self

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10.0) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}") or {"status": "error", "error": f"HTTP {exc.code}"}
        return body

    def query(self, expr: str, at: Optional[float] = None) -> dict:
        """``/api/v1/query``: the whole answer (``status``, ``data`` or ``error``)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> dict:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")

    def targets_up(self) -> int:
        body = self.api("targets")
        return sum(1 for t in body.get("data", {}).get("activeTargets", []) if t.get("health") == "up")

    def wait_for(self, expr: str, timeout: float = 60.0) -> list:
        """Poll until ``expr`` returns a non-empty vector; return it."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.query(expr)
            result = last.get("data", {}).get("result")
            if last.get("status") == "success" and result:
                return result
            time.sleep(0.5)
        raise StackError(f"{expr!r} returned nothing for {timeout} s (last answer {last})")

    def log(self) -> str:
        return self.child.tail(4000) if self.child is not None else ""

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Worker(WorkerProcess):
    """``stormguard run --broker URL --web-port N`` in a child process, ready when started."""

    def start(self, timeout: float = 60.0) -> "Worker":
        super().start()
        self.wait_ready(timeout)
        return self

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=5.0) as resp:
            return resp.read()


def storm_events(end: float, seed: int = 0, background: int = 400, replies: int = 300,
                 storm_minutes: float = 10.0) -> list[bytes]:
    """An NHSmail-shaped stream whose storm ends at event time ``end`` (epoch s).

    Background: person-to-person mail among 60 staff, posts and the odd reply
    to a 40-member team list, an 80-member ward list and a 12,000-member
    bulletin, spread over the three hours before the storm. Then a test
    message from a supplier who never posts to lists to ``all@nhs.example``
    (840,000 members) and ``replies`` reply-alls over ``storm_minutes``.
    """
    rng = random.Random(seed)
    storm_start = end - storm_minutes * 60.0
    t0 = storm_start - 3 * 3600.0
    lists = {"team-a@nhs.example": 40, "ward-7@nhs.example": 80, "bulletin@nhs.example": 12_000}
    out: list[dict] = []
    step = (storm_start - 60.0 - t0) / background
    for i in range(background):
        t = t0 + i * step
        sender = f"staff{rng.randrange(60)}@nhs.example"
        roll = rng.random()
        if roll < 0.70:
            ev = {"recipients": [f"staff{rng.randrange(60)}@nhs.example" for _ in range(rng.randint(1, 3))]}
        else:
            lst = rng.choice(list(lists))
            ev = {"recipients": [lst], "lists": {lst: lists[lst]}}
            if lst == "bulletin@nhs.example":
                sender = "comms@nhs.example"
            if rng.random() < 0.4 and lst != "bulletin@nhs.example":
                ev.update(subject="RE: rota", in_reply_to=f"bg{i - 1}")
            else:
                ev.update(subject="rota")
        out.append({"message_id": f"bg{i}", "timestamp": round(t, 3), "sender": sender, **ev})
    # The supplier has mailed someone before, but never a list.
    out.append({"message_id": "sup0", "timestamp": storm_start - 30.0, "sender": "test@supplier.example",
                "recipients": ["staff1@nhs.example"]})
    big = {STORM_LIST: 840_000}
    out.append({"message_id": "root", "timestamp": storm_start, "sender": "test@supplier.example",
                "recipients": [STORM_LIST], "lists": big, "subject": "test"})
    for j in range(replies):
        t = storm_start + 20.0 + (storm_minutes * 60.0 - 20.0) * (j / max(replies - 1, 1)) ** 0.8
        out.append({"message_id": f"reply{j}", "timestamp": round(t, 3), "sender": f"user{j}@nhs.example",
                    "recipients": [STORM_LIST], "lists": big, "subject": "RE: test",
                    "in_reply_to": "root" if j % 3 else f"reply{max(j - 1, 0)}"})
    out.sort(key=lambda e: e["timestamp"])
    return [json.dumps(e).encode() for e in out]


def produce(broker_url: str, records: list[bytes], rate: float = 0.0) -> int:
    from stream_jobs.kafka.replay import make_producer
    from stream_jobs.kafka.replay import produce as _produce

    producer = make_producer(broker_url)
    try:
        return _produce(records, producer, rate=rate)
    finally:
        producer.close()
