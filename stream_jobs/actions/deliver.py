"""``stormguard deliver``: take actions from the outbox to the people and systems that act on them.

The worker only ever *produces* to ``stormguard.actions`` (the outbox), so
scoring never waits on a receiver. This separate process consumes that topic
and hands every action to every configured sink (:mod:`stream_jobs.actions.sinks`):
Prometheus Alertmanager, signed Alertmanager-v4 webhooks, Grafana annotations, Mailman emergency moderation,
a generic HTTP request.

Guarantees
----------
* **At-least-once, nothing lost.** A record's offset is committed only after
  its sink accepted it (or had nothing to do with it). A receiver that is down
  for an hour is retried with exponential backoff and jitter (capped at
  ``STORMGUARD_DELIVER_BACKOFF_MAX``) for as long as it takes; the actions wait
  in Kafka meanwhile, and a restart of this process resumes from the last
  commit. Receivers drop duplicates by ``webhook-id`` / ``Idempotency-Key``
  (the action's ``action_id``); Grafana and Mailman deliveries are idempotent.
* **One slow or dead sink never blocks another.** Each sink has its own
  consumer (and consumer group, ``<STORMGUARD_DELIVER_GROUP>.<sink name>``, so
  its own committed offsets) and its own asyncio task: a Grafana outage holds
  back Grafana's annotations only, while webhooks and Mailman freezes carry on.
* **In order per list.** Actions are keyed by list (or sender), so a list's
  freeze and unfreeze share a partition; a sink handles one partition's
  records strictly in order, and a failed record is retried before any later
  one (head-of-line by design: an unfreeze must never overtake its freeze).
* **Rejections do not wedge the queue forever.** A receiver that refuses the
  request itself (HTTP 400, 422 …) is retried ``STORMGUARD_DELIVER_MAX_REJECTS``
  times, then the action goes to ``stormguard.actions.dlq`` with the sink and
  the reason, and delivery moves on. Undecodable records go there too.
* **Group membership survives long outages.** A failed record is not retried
  in a blocking loop: its partition is sought back to it and paused until the
  retry is due, while the consumer keeps polling (and heartbeating), so a sink
  that is retrying for an hour is never evicted from its group.

Metrics on ``--web-port`` (``GET /metrics``; ``GET /healthz`` is 200 once every
sink's consumer has joined its group): ``stormguard_outbox_backlog`` (actions
not yet delivered, summed over sinks), ``stormguard_delivery_failures_total{sink}``
(failed attempts, by sink kind), ``stormguard_actions_delivered_total{sink,outcome}``, ``stormguard_ready``.

A sink that keeps state (:attr:`~stream_jobs.actions.sinks.base.Sink.recovers`: Alertmanager's firing
freezes) is first handed what it had delivered before a restart: the outbox up to its group's committed
offsets (:meth:`SinkRunner._history`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

from detectors.policy import Action, decode_action
from stream_jobs.settings import ACTIONS_TOPIC, SettingsError
from stream_jobs.actions.sinks import Rejected, Sink, Skip, describe, sinks_from_env

log = logging.getLogger("stormguard.deliver")

#: Where actions that a sink rejected for good (or that cannot be decoded) are kept.
ACTIONS_DLQ_TOPIC = "stormguard.actions.dlq"
DEFAULT_GROUP = "stormguard-deliver"
DEFAULT_WEB_PORT = 6067
#: Records fetched per poll for one sink (each may take up to the sink timeout).
MAX_RECORDS = 10


@dataclass(frozen=True)
class DeliverSettings:
    """How ``stormguard deliver`` connects and retries; docs/actions.md lists every variable."""

    broker: Optional[str] = None
    group: str = DEFAULT_GROUP
    start: str = "earliest"
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    max_rejects: int = 10
    timeout: float = 10.0
    web_port: int = DEFAULT_WEB_PORT
    web_host: str = "0.0.0.0"
    session_timeout: float = 6.0
    heartbeat_interval: float = 1.0

    @classmethod
    def from_env(cls, environ: Optional[dict] = None, **overrides) -> "DeliverSettings":
        env = os.environ if environ is None else environ

        def num(name, default, kind=float, minimum=0.0):
            raw = env.get(name)
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
            if value < minimum:
                raise SettingsError(f"{name} must be >= {minimum}")
            return value

        values = dict(
            broker=env.get("STORMGUARD_BROKER") or None,
            group=env.get("STORMGUARD_DELIVER_GROUP") or DEFAULT_GROUP,
            start=(env.get("STORMGUARD_DELIVER_START") or "earliest").lower(),
            backoff_base=num("STORMGUARD_DELIVER_BACKOFF_BASE", cls.backoff_base, minimum=0.01),
            backoff_max=num("STORMGUARD_DELIVER_BACKOFF_MAX", cls.backoff_max, minimum=0.01),
            max_rejects=num("STORMGUARD_DELIVER_MAX_REJECTS", cls.max_rejects, int, minimum=1),
            timeout=num("STORMGUARD_DELIVER_TIMEOUT", cls.timeout, minimum=0.1),
            web_port=num("STORMGUARD_DELIVER_WEB_PORT", cls.web_port, int),
            web_host=env.get("STORMGUARD_DELIVER_WEB_HOST") or cls.web_host,
            session_timeout=num("STORMGUARD_SESSION_TIMEOUT", cls.session_timeout, minimum=1.0),
            heartbeat_interval=num("STORMGUARD_HEARTBEAT_INTERVAL", cls.heartbeat_interval, minimum=0.1),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["start"] not in ("earliest", "latest"):
            raise SettingsError("STORMGUARD_DELIVER_START must be earliest or latest")
        if values["backoff_max"] < values["backoff_base"]:
            raise SettingsError("STORMGUARD_DELIVER_BACKOFF_MAX must be >= STORMGUARD_DELIVER_BACKOFF_BASE")
        return cls(**values)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random = random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, never above ``cap``.

    >>> r = random.Random(1)
    >>> [0.25 <= backoff_delay(1, 0.5, 60, r) <= 0.5, 2 <= backoff_delay(4, 0.5, 60, r) <= 4,
    ...  30 <= backoff_delay(50, 0.5, 60, r) <= 60]
    [True, True, True]
    """
    ceiling = min(cap, base * (2 ** min(attempt - 1, 40)))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def kafka_options(environ: Optional[dict] = None) -> dict:
    """TLS and SASL for aiokafka, from the same ``STORMGUARD_KAFKA_*`` variables as the worker."""
    from stream_jobs.settings import WorkerSettings

    return WorkerSettings.from_env(environ).aiokafka_options()


# -- metrics (the shared registry; stormguard_outbox_backlog and _delivery_failures live in metrics.py) ----
_DELIVERIES = None


def _metrics():
    from prometheus_client import Counter

    from stream_jobs import metrics

    global _DELIVERIES
    if _DELIVERIES is None:
        _DELIVERIES = Counter("stormguard_actions_delivered", "Actions handled by a sink, by outcome "
                              "(delivered, skipped, dead_lettered)", ["sink", "outcome"], registry=metrics.REGISTRY)
    return (metrics.REGISTRY, getattr(metrics, "OUTBOX_BACKLOG", None), getattr(metrics, "DELIVERY_FAILURES", None),
            _DELIVERIES)


class _Retry:
    __slots__ = ("attempts", "rejects", "next_at", "since")

    def __init__(self):
        self.attempts = 0
        self.rejects = 0
        self.next_at = 0.0
        self.since = time.monotonic()


class DeadLetters:
    """Producer for ``stormguard.actions.dlq`` (created on first use)."""

    def __init__(self, bootstrap: str, kafka_opts: dict):
        self.bootstrap, self.kafka_opts = bootstrap, kafka_opts
        self._producer = None
        self._lock = asyncio.Lock()

    async def send(self, sink: str, reason: str, raw: bytes, partition: int, offset: int) -> None:
        from aiokafka import AIOKafkaProducer

        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", **self.kafka_opts)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
        try:
            action = raw.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            action, encoding = base64.b64encode(raw).decode(), "base64"
        record = {"sink": sink, "reason": reason, "topic": ACTIONS_TOPIC, "partition": partition, "offset": offset,
                  "action": action, "encoding": encoding, "at": time.time()}
        await self._producer.send_and_wait(ACTIONS_DLQ_TOPIC, json.dumps(record).encode(), key=sink.encode())

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class SinkRunner:
    """One sink fed by its own consumer group; see the module docstring for the guarantees."""

    def __init__(self, sink: Sink, settings: DeliverSettings, bootstrap: str, kafka_opts: dict,
                 dead_letters: DeadLetters, stop: asyncio.Event, on_backlog=None, topic: str = ACTIONS_TOPIC):
        self.sink, self.settings, self.bootstrap, self.kafka_opts = sink, settings, bootstrap, kafka_opts
        self.dead_letters, self.stop, self.topic = dead_letters, stop, topic
        self.group = f"{settings.group}.{sink.name}"
        self.ready = False
        self.backlog = 0
        self._on_backlog = on_backlog or (lambda: None)
        self._retry: dict = {}  # partition -> (offset, _Retry) of its head record while it fails
        self._next: dict = {}
        self._rng = random.Random()
        _, _, self._failures, self._deliveries = _metrics()

    # -- plumbing -----------------------------------------------------------------------------------
    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _wait_for_topic(self) -> bool:
        """Wait until the worker has created the outbox topic (subscribing would auto-create it wrongly)."""
        from aiokafka.admin import AIOKafkaAdminClient

        attempt = 0
        announced = False
        while not self.stop.is_set():
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self.kafka_opts)
            try:
                await admin.start()
                if self.topic in await admin.list_topics():
                    return True
                if not announced:
                    log.warning("%s: waiting for topic %s (the worker creates it)", self.sink.name, self.topic)
                    announced = True
                attempt = 0
            except Exception as exc:  # broker down or not there yet
                attempt += 1
                log.warning("%s: broker not reachable (%s); retrying", self.sink.name, describe(exc))
            finally:
                try:
                    await admin.close()
                except Exception:
                    pass
            await self._sleep(backoff_delay(max(attempt, 2), 0.5, 5.0, self._rng))
        return False

    def _consumer(self):
        from aiokafka import AIOKafkaConsumer

        # A handful of records per poll: each may take up to the sink timeout, and the consumer must poll
        # again within max_poll_interval or be evicted from its group.
        poll_interval = max(300.0, MAX_RECORDS * (self.settings.timeout + 5.0) * 2)
        return AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap, group_id=self.group, client_id=f"stormguard-{self.group}",
            enable_auto_commit=False, auto_offset_reset=self.settings.start, metadata_max_age_ms=5000,
            # an exactly-once worker's aborted writes are not actions (STORMGUARD_EXACTLY_ONCE)
            isolation_level="read_committed",
            session_timeout_ms=int(self.settings.session_timeout * 1000),
            heartbeat_interval_ms=int(self.settings.heartbeat_interval * 1000),
            rebalance_timeout_ms=int(self.settings.session_timeout * 1000),
            max_poll_interval_ms=int(poll_interval * 1000),
            **self.kafka_opts)

    def _update_backlog(self, consumer) -> None:
        total = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            pos = self._next.get(tp)
            if high is not None and pos is not None:
                total += max(0, high - pos)
        self.backlog = total
        self._on_backlog()

    async def _commit(self, consumer, offsets: dict) -> None:
        try:
            await consumer.commit(offsets)
        except Exception as exc:  # a rebalance: the records come back to someone and are redelivered
            log.warning("%s: commit failed (%s); those actions may be delivered again", self.sink.name,
                        describe(exc))

    def _resume_due(self, consumer) -> float:
        """Resume partitions whose retry is due; seconds until the next one is (for the poll timeout)."""
        now = time.monotonic()
        soonest = 0.5
        for tp in list(consumer.paused()):
            entry = self._retry.get(tp)
            due = entry[1].next_at if entry else now
            if due <= now:
                consumer.resume(tp)
            else:
                soonest = min(soonest, due - now)
        return max(soonest, 0.01)

    async def _history(self) -> list[Action]:
        """Every decodable action this sink already delivered: the outbox up to its group's committed offsets.

        The partitions are assigned by hand, so this reads the group's offsets without joining the group.
        """
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
                                    client_id=f"stormguard-{self.group}-history", **self.kafka_opts)
        await consumer.start()
        actions: list[Action] = []
        try:
            parts = consumer.partitions_for_topic(self.topic)
            while not parts and not self.stop.is_set():
                await consumer.force_metadata_update()
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    await self._sleep(0.2)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts or ())]
            if not tps:
                return actions
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = {tp: (await consumer.committed(tp)) or 0 for tp in tps}
            todo = {tp for tp in tps if ends[tp] > 0}
            while todo and not self.stop.is_set():
                for tp, records in (await consumer.getmany(*todo, timeout_ms=500)).items():
                    for rec in records:
                        if rec.offset < ends[tp]:
                            try:
                                actions.append(decode_action(rec.value))
                            except Exception:
                                pass  # dead-lettered when the sink's consumer reaches it
                for tp in list(todo):
                    if await consumer.position(tp) >= ends[tp]:
                        todo.discard(tp)
        finally:
            await consumer.stop()
        return actions

    async def _recover(self) -> None:
        """Hand what this sink delivered before a restart to a sink that keeps state (Alertmanager's firing
        freezes); what it has not delivered yet it gets in order, as always."""
        attempt = 0
        while not self.stop.is_set():
            try:
                actions = await self._history()
            except Exception as exc:
                attempt += 1
                log.warning("%s: cannot read %s's history (%s); retrying", self.sink.name, self.topic, describe(exc))
                await self._sleep(backoff_delay(attempt, 0.5, 10.0, self._rng))
                continue
            self.sink.recover(actions)
            log.info("%s: recovered from %d action(s) in %s", self.sink.name, len(actions), self.topic)
            return

    # -- the loop --------------------------------------------------------------------------------------
    async def run(self) -> None:
        if not await self._wait_for_topic():
            return
        if self.sink.recovers:
            await self._recover()
        consumer = None
        attempt = 0
        while not self.stop.is_set():
            consumer = self._consumer()
            try:
                await consumer.start()
                break
            except Exception as exc:
                attempt += 1
                log.warning("%s: cannot start consumer (%s); retrying", self.sink.name, describe(exc))
                await consumer.stop()
                consumer = None
                await self._sleep(backoff_delay(attempt, 0.5, 10.0, self._rng))
        if consumer is None:
            return
        log.info("%s: consuming %s as group %s", self.sink.name, self.topic, self.group)
        try:
            await self.sink.start()
            while not self.stop.is_set():
                timeout = self._resume_due(consumer)
                batches = await consumer.getmany(timeout_ms=int(timeout * 1000), max_records=MAX_RECORDS)
                if consumer.assignment():
                    self.ready = True
                for tp, records in batches.items():
                    done = None
                    for rec in records:
                        self._next[tp] = rec.offset
                        if not await self._handle(tp, rec):
                            # Not delivered yet: come back to this very record when its retry is due;
                            # meanwhile the other partitions (and every other sink) carry on.
                            consumer.seek(tp, rec.offset)
                            consumer.pause(tp)
                            break
                        done = rec.offset + 1
                        self._next[tp] = done
                    if done is not None:
                        await self._commit(consumer, {tp: done})
                    if self.stop.is_set():
                        break
                self._update_backlog(consumer)
        finally:
            self.ready = False
            try:
                await consumer.stop()
            finally:
                await self.sink.close()

    async def _handle(self, tp, rec) -> bool:
        """One delivery attempt; True when the record may be committed, False when a retry is scheduled."""
        try:
            action: Action = decode_action(rec.value)
        except Exception as exc:
            return await self._dead_letter(tp, rec, f"undecodable action: {type(exc).__name__}")
        if not self.sink.accepts(action):
            return True
        entry = self._retry.get(tp)
        if entry is None or entry[0] != rec.offset:
            entry = self._retry[tp] = (rec.offset, _Retry())
        state = entry[1]
        if state.next_at > time.monotonic():
            return False
        try:
            await asyncio.wait_for(self.sink.deliver(action), timeout=self.settings.timeout + 5.0)
        except Skip as exc:
            log.info("%s: skipped %s %s (%s)", self.sink.name, action.kind, action.action_id, exc)
            self._deliveries.labels(sink=self.sink.kind, outcome="skipped").inc()
            self._retry.pop(tp, None)
            return True
        except Rejected as exc:
            state.rejects += 1
            self._count_failure()
            if state.rejects >= self.settings.max_rejects:
                log.error("%s: %s %s rejected %d times (%s); dead-lettering it to %s", self.sink.name,
                          action.kind, action.action_id, state.rejects, describe(exc), ACTIONS_DLQ_TOPIC)
                if await self._dead_letter(tp, rec, f"rejected by {self.sink.name}: {describe(exc)}"):
                    self._retry.pop(tp, None)
                    return True
            self._schedule(state, action, exc)
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._count_failure()
            self._schedule(state, action, exc)
            return False
        if state.attempts:
            log.warning("%s: delivered %s %s after %d failed attempts (%.0f s)", self.sink.name,
                        action.kind, action.action_id, state.attempts, time.monotonic() - state.since)
        self._deliveries.labels(sink=self.sink.kind, outcome="delivered").inc()
        self._retry.pop(tp, None)
        return True

    def _count_failure(self) -> None:
        if self._failures is not None:
            self._failures.labels(sink=self.sink.kind).inc()

    def _schedule(self, state: _Retry, action: Action, exc: BaseException) -> None:
        state.attempts += 1
        delay = backoff_delay(state.attempts, self.settings.backoff_base, self.settings.backoff_max, self._rng)
        state.next_at = time.monotonic() + delay
        # Every attempt at INFO; WARNING on the 1st, 2nd, 4th, 8th ... so an hour-long outage stays readable.
        level = logging.WARNING if state.attempts & (state.attempts - 1) == 0 else logging.INFO
        log.log(level, "%s: %s %s not delivered (%s); attempt %d, next in %.1f s", self.sink.name, action.kind,
                action.action_id, describe(exc), state.attempts, delay)

    async def _dead_letter(self, tp, rec, reason: str) -> bool:
        try:
            await self.dead_letters.send(self.sink.name, reason, rec.value or b"", tp.partition, rec.offset)
        except Exception as exc:
            self._count_failure()
            log.warning("%s: cannot write to %s (%s); will retry", self.sink.name, ACTIONS_DLQ_TOPIC, describe(exc))
            await self._sleep(backoff_delay(2, self.settings.backoff_base, self.settings.backoff_max, self._rng))
            return False
        self._deliveries.labels(sink=self.sink.kind, outcome="dead_lettered").inc()
        return True


class Deliverer:
    """All sink runners of one process, plus the optional /healthz and /metrics server."""

    def __init__(self, sinks: list[Sink], settings: DeliverSettings, environ: Optional[dict] = None):
        from stream_jobs.kafka.replay import bootstrap_servers

        if not sinks:
            raise SettingsError("no sink configured: set STORMGUARD_ALERTMANAGER_URLS, STORMGUARD_WEBHOOK_URLS, "
                                "GRAFANA_URL, STORMGUARD_MAILMAN_URL or STORMGUARD_HTTP_URL (see docs/actions.md)")
        self.sinks, self.settings = sinks, settings
        self.bootstrap = ",".join(bootstrap_servers(settings.broker))
        self.kafka_opts = kafka_options(environ)
        self.stop = asyncio.Event()
        self.dead_letters = DeadLetters(self.bootstrap, self.kafka_opts)
        registry, self._backlog_gauge, _, _ = _metrics()
        self.registry = registry
        self.runners = [SinkRunner(s, settings, self.bootstrap, self.kafka_opts, self.dead_letters, self.stop,
                                   on_backlog=self._publish_backlog) for s in sinks]
        self._web = None
        self.crashed = False
        from stream_jobs import metrics

        metrics.READY.set_function(lambda: 1.0 if self.ready else 0.0)

    def _publish_backlog(self) -> None:
        if self._backlog_gauge is not None:
            self._backlog_gauge.set(sum(r.backlog for r in self.runners))

    @property
    def ready(self) -> bool:
        return all(r.ready for r in self.runners)

    async def _start_web(self) -> None:
        if not self.settings.web_port:
            return
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        async def healthz(request):
            body = {"ready": self.ready, "sinks": {r.sink.name: {"ready": r.ready, "backlog": r.backlog}
                                                   for r in self.runners}}
            return web.json_response(body, status=200 if self.ready else 503)

        async def metrics(request):
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.settings.web_host, self.settings.web_port).start()
        self._web = runner

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        await self._start_web()
        print(f"stormguard deliver: {len(self.runners)} sink(s) "
              f"({', '.join(r.sink.name for r in self.runners)}) from {ACTIONS_TOPIC} on {self.bootstrap}; "
              f"consumer groups {self.settings.group}.<sink>"
              + (f"; /healthz and /metrics on port {self.settings.web_port}" if self.settings.web_port else ""),
              file=sys.stderr, flush=True)
        tasks = [asyncio.create_task(r.run(), name=f"deliver:{r.sink.name}") for r in self.runners]
        try:
            stopper = asyncio.create_task(self.stop.wait())
            pending = set(tasks)
            while pending and not self.stop.is_set():
                done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                done.discard(stopper)
                pending.discard(stopper)
                for task in done:
                    if task.exception() is not None:
                        # A runner must never die silently: stop everything, let a supervisor restart us.
                        log.error("sink runner %s crashed: %s", task.get_name(), describe(task.exception()))
                        self.crashed = True
                        self.stop.set()
            self.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            stopper.cancel()
        finally:
            await self.dead_letters.close()
            if self._web is not None:
                await self._web.cleanup()


def run_deliver(broker: Optional[str] = None, web_port: Optional[int] = None) -> int:
    from stream_jobs.kafka.preflight import refusal
    from stream_jobs.kafka.replay import bootstrap_servers

    settings = DeliverSettings.from_env(broker=broker, web_port=web_port)
    refused = refusal(bootstrap_servers(settings.broker))  # aiokafka would retry a refused password or certificate for ever
    if refused:
        print(f"stormguard deliver: cannot start: {refused}", file=sys.stderr, flush=True)
        return 2
    deliverer = Deliverer(sinks_from_env(), settings)
    try:
        asyncio.run(deliverer.run())
    except KeyboardInterrupt:
        pass
    return 1 if deliverer.crashed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deliver", help=f"deliver actions from {ACTIONS_TOPIC} to Alertmanager, webhooks, Grafana, Mailman, HTTP")
    p.add_argument("--broker", help="kafka://HOST:PORT (default $STORMGUARD_BROKER or kafka://127.0.0.1:9092)")
    p.add_argument("--web-port", type=int,
                   help=f"port for /healthz and /metrics (default $STORMGUARD_DELIVER_WEB_PORT or "
                        f"{DEFAULT_WEB_PORT}; 0: none)")
    p.set_defaults(func=_deliver)


def _deliver(args) -> int:
    return run_deliver(broker=args.broker, web_port=args.web_port)
