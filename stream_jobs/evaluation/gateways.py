"""The gateways of the closed loop: whatever says, for each submitted message, whether it is delivered.

The simulator (:func:`stream_jobs.evaluation.simulate.scenario_events`) is the mail
gateway; one of these decides for it:

* :class:`OpenGateway` delivers everything (the storm as it was, unstopped);
* :class:`StormguardGateway` runs the detectors in-process, exactly as ``stormguard score`` does;
* :class:`ThreadHoldGateway` is the same with ``stormguard milter`` in the gateway: it also holds
  the replies into a thread that Stormguard's decisions hold (an anomalous first post's; a storm's);
* :class:`PeerGateway` runs a peer rule (:mod:`detectors.peers`: Exchange's, a static threshold);
* :class:`FanGateway` feeds several at once and delivers everything (benign runs);
* :class:`LiveGateway` produces every message to a broker and holds posts to the lists a running
  worker froze (``stormguard simulate --broker``, ``stormguard evaluate --live``, ``make demo``);
  :class:`LiveSession` starts the broker and worker it needs.

How the live gateway keeps pace: background mail is produced as fast as the broker
takes it. Before each post to a *watched* list (the scenario's storm list) it
waits until the worker has scored everything produced so far (its
``/metrics`` counters) and has published the resulting actions, as a gateway
consulting Stormguard would; ``speed`` also spaces those posts in wall time
(event-time seconds per wall second).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

from detectors.engine import StormDetector
from detectors.events import InvalidEvent, MailEvent, encode_event
from detectors.holds import HoldBook
from detectors.peers import ExchangeReplyAllRule, StaticThresholdRule
from detectors.policy import Action, PolicyConfig, decode_action
from stream_jobs.settings import ACTIONS_TOPIC, EVENTS_TOPIC
from stream_jobs.worker.processes import ProcessError, WorkerProcess


class Gateway(Protocol):
    """The mail gateway in the loop: says whether each submitted message is delivered."""

    def submit(self, event: MailEvent) -> bool: ...


class OpenGateway:
    """Delivers everything (the storm as it was, unstopped)."""

    def submit(self, event: MailEvent) -> bool:
        return True


class StormguardGateway:
    """The gateway with Stormguard in-process: holds posts to lists its actions froze."""

    name = "stormguard"

    def __init__(self, config: Optional[PolicyConfig] = None):
        self.detector = StormDetector(config)
        self.frozen: set[str] = set()
        self.actions: list[Action] = []
        self.invalid = 0

    def submit(self, event: MailEvent) -> bool:
        held = any(a in self.frozen for a in event.lists)
        try:
            actions = self.detector.process(event)
        except InvalidEvent:
            self.invalid += 1
            return not held
        for a in actions:
            self.actions.append(a)
            if a.kind == "freeze" and a.list:
                self.frozen.add(a.list)
            elif a.kind == "unfreeze" and a.list:
                self.frozen.discard(a.list)
        return not held

    def freezes(self) -> list[tuple[float, str]]:
        return [(a.event_time, a.list) for a in self.actions if a.kind == "freeze"]

    def alerts(self) -> list[tuple[float, Optional[str]]]:
        return [(a.event_time, a.list) for a in self.actions if a.kind == "alert"]


class ThreadHoldGateway(StormguardGateway):
    """Stormguard with a milter in the gateway: holds posts to frozen lists and replies into held threads.

    The decisions are the same detector's (held messages are still submitted, and scored, as the milter
    produces an event for every message it sees); only the gateway holds more: what
    :class:`detectors.holds.HoldBook` says, the milter's own lookup.
    """

    name = "thread-hold"

    def __init__(self, config: Optional[PolicyConfig] = None):
        super().__init__(config)
        self.book = HoldBook()
        #: Messages held because they replied into a held thread (the list itself not frozen).
        self.thread_held = 0

    def submit(self, event: MailEvent) -> bool:
        hold = self.book.decide(event.lists, [event.in_reply_to] if event.in_reply_to else [], event.event_time) \
            if event.lists else None
        if hold is not None and hold.kind == "thread":
            self.thread_held += 1
        try:
            actions = self.detector.process(event)
        except InvalidEvent:
            self.invalid += 1
            return hold is None
        for a in actions:
            self.actions.append(a)
            self.book.apply(a)
        return hold is None


class PeerGateway:
    """The gateway with a peer rule (:mod:`detectors.peers`) deciding."""

    def __init__(self, rule):
        self.rule = rule
        self.name = rule.name

    def submit(self, event: MailEvent) -> bool:
        return not self.rule.check(event).held

    def freezes(self) -> list[tuple[float, str]]:
        return list(self.rule.fired)

    def alerts(self) -> list:
        return []


class FanGateway:
    """Feeds every event to several gateways; delivers everything (benign runs)."""

    def __init__(self, gateways: list):
        self.gateways = gateways

    def submit(self, event: MailEvent) -> bool:
        for g in self.gateways:
            g.submit(event)
        return True


def make_gateways(config: Optional[PolicyConfig] = None) -> dict[str, Any]:
    return {"stormguard": StormguardGateway(config), "thread-hold": ThreadHoldGateway(config), "exchange": PeerGateway(ExchangeReplyAllRule()),
            "exchange-tight": PeerGateway(ExchangeReplyAllRule.tightest()),
            "static": PeerGateway(StaticThresholdRule())}


# -- live: a broker and a worker in the loop ------------------------------------------------------
class LiveError(RuntimeError):
    pass


def _http(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:  # type: ignore[attr-defined]
        return exc.code, exc.read()


_COUNTER = re.compile(rb"^(stormguard_events_(?:processed|invalid)_total|stormguard_actions_total)"
                      rb"(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)


def worker_counts(worker_url: str) -> tuple[int, int]:
    """(records the worker has finished with, actions it has published), from its /metrics."""
    status, body = _http(worker_url + "/metrics")
    if status != 200:
        raise LiveError(f"GET {worker_url}/metrics answered {status}")
    records = actions = 0.0
    for m in _COUNTER.finditer(body):
        if m.group(1) == b"stormguard_actions_total":
            actions += float(m.group(2))
        else:
            records += float(m.group(2))
    return int(records), int(actions)


class LiveGateway:
    """The simulator as a live mail gateway: produce every message, hold posts to frozen lists."""

    name = "stormguard"

    def __init__(self, broker: str, worker_url: Optional[str] = None, speed: float = 0.0,
                 watch: Iterable[str] = (), timeout: float = 10.0,
                 on_action: Optional[Callable[[Action], None]] = None):
        from kafka import KafkaConsumer, TopicPartition

        from stream_jobs.kafka.replay import bootstrap_servers, kafka_security, make_producer, routing_key

        self.routing_key = routing_key
        self.producer = make_producer(broker)
        self.worker_url = worker_url
        self.speed, self.timeout = speed, timeout
        self.watch = set(watch)
        self.on_action = on_action
        self.frozen: set[str] = set()
        self.actions: list[Action] = []
        self.produced = 0
        self.baseline = worker_counts(worker_url) if worker_url else (0, 0)
        self._closed = False
        self._last_wall: Optional[float] = None
        self._last_event: Optional[float] = None
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers(broker), enable_auto_commit=False,
                                      group_id=None, consumer_timeout_ms=50, **kafka_security())
        deadline = time.monotonic() + timeout
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = self.consumer.partitions_for_topic(ACTIONS_TOPIC)
            if not parts:
                time.sleep(0.1)
        if not parts:
            raise LiveError(f"topic {ACTIONS_TOPIC} does not exist on {broker}: is a worker running?")
        tps = [TopicPartition(ACTIONS_TOPIC, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, before anything is produced
            self.consumer.position(tp)

    # -- the gateway protocol ---------------------------------------------------------
    def submit(self, event: MailEvent) -> bool:
        watched = bool(self.watch.intersection(event.lists))
        if watched:
            self._pace(event.event_time)
            self.sync()
        held = any(a in self.frozen for a in event.lists)
        raw = encode_event(event)
        self.producer.send(EVENTS_TOPIC, value=raw, key=self.routing_key(raw))
        self.produced += 1
        return not held

    def sync(self) -> None:
        """Wait until the worker has scored everything produced, then read the actions it published."""
        self.producer.flush()
        if self.worker_url:
            deadline = time.monotonic() + self.timeout
            last = None
            while True:
                records, published = worker_counts(self.worker_url)
                records, published = records - self.baseline[0], published - self.baseline[1]
                if records >= self.produced and len(self.actions) >= published:
                    break
                if (records, published, len(self.actions)) != last:  # still moving: give it more time
                    last, deadline = (records, published, len(self.actions)), time.monotonic() + self.timeout
                elif time.monotonic() > deadline:
                    raise LiveError(f"the worker scored {records} of {self.produced} records and published "
                                    f"{published} actions ({len(self.actions)} read), then nothing more for "
                                    f"{self.timeout:.0f} s")
                if records >= self.produced:
                    self.poll_actions()  # its actions are on their way
                else:
                    time.sleep(0.005 if self.produced - records < 50 else 0.05)
            return
        self.poll_actions()

    def poll_actions(self) -> None:
        for batch in self.consumer.poll(timeout_ms=30).values():
            for record in batch:
                action = decode_action(record.value)
                self.actions.append(action)
                if action.kind == "freeze" and action.list:
                    self.frozen.add(action.list)
                elif action.kind == "unfreeze" and action.list:
                    self.frozen.discard(action.list)
                if self.on_action is not None:
                    self.on_action(action)

    def _pace(self, t: float) -> None:
        if self.speed <= 0:
            return
        now = time.monotonic()
        if self._last_wall is not None and self._last_event is not None:
            due = self._last_wall + max(0.0, t - self._last_event) / self.speed
            if due > now:
                time.sleep(min(due - now, 5.0))
        self._last_wall, self._last_event = time.monotonic(), t

    # -- what evaluate reads (after the run: the first call closes the gateway) ---------------
    def freezes(self) -> list[tuple[float, str]]:
        self.close()
        return [(a.event_time, a.list) for a in self.actions if a.kind == "freeze"]

    def alerts(self) -> list[tuple[float, Optional[str]]]:
        self.close()
        return [(a.event_time, a.list) for a in self.actions if a.kind == "alert"]

    def close(self) -> None:
        """Wait for the worker to score the last records, read their actions, and disconnect."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sync()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # actions of the last records
                self.poll_actions()
        finally:
            self.producer.close(timeout=5)
            self.consumer.close()


class LiveSession:
    """A broker and a worker for live runs: started here unless ``broker`` is given."""

    def __init__(self, broker: Optional[str] = None, web_port: Optional[int] = None, speed: float = 0.0,
                 progress: bool = True, on_action: Optional[Callable[[Action], None]] = None):
        self.given_broker, self.given_port = broker, web_port
        self.speed, self.progress, self.on_action = speed, progress, on_action
        self.broker = None
        self.worker: Optional[WorkerProcess] = None
        self.tmp: Optional[Path] = None
        self.gateways: list[LiveGateway] = []

    def start(self) -> "LiveSession":
        if self.given_broker is None:
            self.tmp = Path(tempfile.mkdtemp(prefix="stormguard-live-"))
        return self

    def _fresh(self) -> tuple[str, str]:
        """A fresh broker and worker per scenario (a scenario's event times restart)."""
        if self.given_broker is not None:
            return self.given_broker, f"http://127.0.0.1:{self.given_port or 6066}"
        from stream_jobs.kafka.broker import EmbeddedBroker, free_port

        self._stop_started()
        assert self.tmp is not None
        self.broker = EmbeddedBroker(port=free_port(), log_path=self.tmp / "broker.log").start()
        self.worker = WorkerProcess(self.broker.url, self.tmp, app_id=f"sg-demo-{uuid.uuid4().hex[:8]}").start()
        try:
            self.worker.wait_ready()
        except ProcessError as exc:
            raise LiveError(str(exc)) from None
        return self.broker.url, self.worker.url

    def gateway(self, scenario) -> LiveGateway:
        broker, worker_url = self._fresh()
        watch = [scenario.storm.list_address] if scenario.storm else []
        gw = LiveGateway(broker, worker_url, speed=self.speed, watch=watch, on_action=self.on_action)
        self.gateways.append(gw)
        return gw

    def _stop_started(self) -> None:
        for gw in self.gateways:
            try:
                gw.close()
            except Exception:  # the worker is gone already: nothing more to read
                pass
        self.gateways.clear()
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def stop(self) -> None:
        self._stop_started()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
