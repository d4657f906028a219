"""``make demo``: the NHSmail storm of 14 November 2016, replayed live through Stormguard.

``python -m stream_jobs.evaluation.demo`` starts an embedded broker and a worker
(``stormguard run``), then plays the ``nhsmail`` scenario through Kafka with
the simulator acting as the mail gateway: every message is produced to
``mail.events``; posts to lists that ``stormguard.actions`` froze are held,
so the storm really stops. It prints the freeze as it happens, a summary
against Exchange Online's default rule on the same traffic, writes the
report (``out/demo/report.md`` with plots) and stops everything it started.

The live machinery (:class:`LiveGateway`, :class:`LiveSession`) is also what
``stormguard evaluate --live`` and ``stormguard simulate --broker`` use.

How the gateway keeps pace: background mail is produced as fast as the broker
takes it. Before each post to a *watched* list (the scenario's storm list) it
waits until the worker has scored everything produced so far (its
``/metrics`` counters) and has published the resulting actions, as a gateway
consulting Stormguard would; ``speed`` also spaces those posts in wall time
(event-time seconds per wall second).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional

from detectors.events import MailEvent, encode_event
from detectors.policy import Action, decode_action
from stream_jobs.worker.processes import ProcessError, WorkerProcess
from stream_jobs.settings import ACTIONS_TOPIC, EVENTS_TOPIC


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


def run_demo(seed: int = 0, speed: float = 150.0, out: Path = Path("out/demo"), progress: bool = True) -> int:
    from tqdm import tqdm

    from stream_jobs.evaluation.evaluate import evaluate_storm, to_json
    from stream_jobs.evaluation.report import _dur, _num, write_report
    from stream_jobs.evaluation.simulate import OpenGateway, scenario, scenario_events

    started = time.monotonic()
    sc = scenario("nhsmail", seed)
    print("Stormguard demo: the NHSmail reply-all storm of 14 November 2016, live.", flush=True)
    print(f"  {sc.description}.", flush=True)
    total = scenario_events(sc, OpenGateway()).events
    bar = None

    def say(text: str) -> None:
        (bar.write if bar is not None else print)(text)

    def on_action(a: Action) -> None:
        when = _dt.datetime.fromtimestamp(a.event_time, _dt.timezone.utc).strftime("%a %d %b %H:%M:%S")
        if a.kind == "freeze" and a.list == sc.storm.list_address:
            say(f"  *** FROZEN {a.list} ({when}, {_dur(a.event_time - sc.storm.at)} after the first post) "
                f"by {a.detector}: {a.reason}")
        elif a.kind == "freeze":
            say(f"  freeze of {a.list} ({when}; background traffic, not the storm): {a.reason}")
        elif a.kind == "alert" and a.list == sc.storm.list_address:
            say(f"  alert on {a.list} ({when}): {a.reason}")

    session = LiveSession(speed=speed, progress=progress, on_action=on_action).start()
    try:
        print("  starting an embedded broker and a worker (stormguard run) ...", flush=True)
        t = time.monotonic()
        gw = session.gateway(sc)
        print(f"  worker ready in {time.monotonic() - t:.1f} s at {session.worker.url}; replaying "
              f"{sc.storm.members:,}-member storm after {(sc.storm.at - sc.start) / 86400:.1f} days of "
              "background mail ...", flush=True)
        bar = tqdm(total=total, unit="msg", desc="gateway → mail.events", file=sys.stdout, disable=not progress,
                   dynamic_ncols=True, mininterval=0.3)
        counting = _Counting(gw, bar)
        result = evaluate_storm(sc, live_gateway=counting)
    finally:
        if bar is not None:
            bar.close()
        session.stop()
    sg, ex = result.guards["stormguard"], result.guards["exchange"]
    print()
    print(f"Summary (seed {seed}, {time.monotonic() - started:.0f} s wall):")
    print(f"  unstopped:  {result.unstopped_messages:,} storm messages, {_num(result.unstopped_deliveries)} "
          "deliveries in 75 min")
    print(f"  Stormguard (live): froze the list {_dur(sg.freeze_after_s)} after the first post, "
          f"{sg.replies_delivered_before_freeze} reply-all(s) delivered; {_num(sg.deliveries)} deliveries made, "
          f"{_num(sg.prevented)} prevented ({sg.prevented_pct:.2f}%)")
    print(f"  Exchange default rule: blocked the thread after {_dur(ex.freeze_after_s)}, "
          f"{ex.replies_delivered_before_freeze} reply-alls delivered; {_num(ex.deliveries)} deliveries made, "
          f"{_num(ex.prevented)} prevented ({ex.prevented_pct:.2f}%)")
    print(f"  Stormguard prevented {_num(sg.prevented - ex.prevented)} more deliveries than Exchange's rule "
          "on the same traffic.")
    report = write_report(to_json([result], [], seed, time.monotonic() - started, live=True), out)
    print(f"  report: {report}")
    ok = bool(result.passed) and sg.replies_delivered == sg.replies_delivered_before_freeze
    if not ok:
        print("Stormguard did not stop the storm within 1 reply-all (or a reply-all got through after the "
              "freeze).", file=sys.stderr)
    return 0 if ok else 1


class _Counting:
    """A gateway wrapper that ticks the progress bar."""

    def __init__(self, gw: LiveGateway, bar):
        self.gw, self.bar, self.name = gw, bar, gw.name

    def submit(self, event: MailEvent) -> bool:
        self.bar.update(1)
        return self.gw.submit(event)

    def freezes(self):
        return self.gw.freezes()

    def alerts(self):
        return self.gw.alerts()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_jobs.evaluation.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="scenario seed (default 0)")
    p.add_argument("--speed", type=float, default=150.0,
                   help="event-time seconds per wall second for posts to the storm list (default 150)")
    p.add_argument("--out", default="out/demo", help="report directory (default out/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        return run_demo(args.seed, args.speed, Path(args.out), not args.no_progress)
    except LiveError as exc:
        print(f"stormguard demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
