"""The live worker: a Faust app that feeds ``mail.events`` through the detectors.

:func:`create_app` builds it from :class:`stream_jobs.settings.WorkerSettings`: the app, its
topics, the ``list_state`` and ``list_models`` tables, two short agents, the timers and the web
views, all around one :class:`StormguardWorker` that holds the detector and the worker's state.
Importing this module builds nothing; ``stormguard run`` (:mod:`stream_jobs.worker.serve`)
sets the environment, calls :func:`create_app` and starts the app.

The agents are thin: every decision is :class:`detectors.engine.StormDetector`'s,
the same object ``stormguard score`` uses offline.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import logging
import os
import pickle
import time
import uuid
import weakref
from time import perf_counter
from typing import Any, Optional

import faust
import msgspec
from faust.sensors import Sensor
from faust.types import TP
from faust.streams import _current_event  # faust-streaming 0.15 (pinned): the record a table write belongs to
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from detectors.engine import ListStatus, Outcome, StormDetector, refused
from detectors.events import InvalidEvent, MailEvent, parse_event
from detectors.policy import Action, encode_action, shadow
from kafka.partitioner.default import murmur2

from stream_jobs import metrics
from stream_jobs.worker.event_order import EventTimeScheduler, event_time_of
from stream_jobs.worker.faust_tuning import RawSchema, RecordEvent, StormguardApp
from stream_jobs.worker.heap import CollectorPace
from stream_jobs.worker.latency_trace import LatencyTrace
from stream_jobs.settings import (ACTIONS_TOPIC, COMMANDS_TOPIC, DLQ_TOPIC, EVENTS_TOPIC, LIST_STATE_TOPIC,
                                  THREAD_WATCH_TOPIC, WorkerSettings, by_list_topic, secret)

log = logging.getLogger("stormguard.worker")

_META_KEY = "__stormguard_meta__"
#: Records scored per batch at most, and the longest wait to fill one (seconds):
#: under light traffic a record waits at most this long before it is scored.
BATCH_MAX = 500
BATCH_WITHIN = 0.01
#: Turns of the event loop given to the producer after a decision is published, so that it is sent before the
#: rest of its batch is scored (aiokafka's send task starts on the third; measured with the embedded broker).
HAND_OVER_TURNS = 4
#: A batch whose newest record was produced longer ago than this (seconds) is a backlog being caught up:
#: its changed list models wait for the next offset commit (see :meth:`StormguardWorker.score_batch`).
CATCH_UP_S = 1.0
#: Seconds between an agent's death and the process's exit: long enough for a last /healthz and log line.
EXIT_AFTER_DEATH_S = 2.0
#: Faust's names for the agents and timers (as they were when the app was declared at module level).
_NAME = "stream_jobs.worker"


def create_app(settings: Optional[WorkerSettings] = None) -> StormguardApp:
    """The worker's Faust app, with its agents, timers and web views (settings: from the environment)."""
    return StormguardWorker(settings or WorkerSettings.from_env()).app


class StormguardWorker:
    """One worker: the app, its topics and tables, the detector, and what the agents and views share."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.by_list_name = by_list_topic(settings.app_id)
        worker = self

        class EventOrder(EventTimeScheduler):
            """Both event topics merged oldest event first across this worker's partitions."""

            ordered_topics = frozenset({EVENTS_TOPIC, self.by_list_name})
            max_wait = settings.order_wait_ms / 1000.0
            has_backlog = staticmethod(self._has_backlog)
            assigned = staticmethod(lambda: worker.app.consumer.assignment())
            # a rebalance or a seek back to the committed offsets: what the merge holds is fetched again
            generation = staticmethod(lambda: (worker.app.consumer_generation_id,
                                               getattr(worker.app.consumer, "seek_epoch", None)))
            # the batch path hands what the merge decoded on to the scorer; elsewhere only the time is read
            decode = staticmethod(decode_record) if settings.fast_drain and not settings.exactly_once else None

            if settings.latency_trace:
                def iterate(self, records):
                    return worker.trace.iterate(super().iterate, records, self.ordered_topics)

                def iterate_decoded(self, records):  # what the batch consumer calls
                    return worker.trace.iterate(super().iterate_decoded, records, self.ordered_topics)

        #: STORMGUARD_LATENCY_TRACE: where each freeze's time went, one log line per freeze (None: off)
        self.trace = LatencyTrace() if settings.latency_trace else None

        app = self.app = StormguardApp.from_settings(settings, ConsumerScheduler=EventOrder)
        app.stormguard = self  # what the agents and views share, for whoever holds only the app
        #: Shares of lists whose by-list partition this worker reads are scored at once, not sent through the
        #: broker and read back (:meth:`score_share_here`); the batch path only (exactly-once keeps its transactions).
        self.local_shares = app.fast_drain and app.scoring is None

        # Bytes on the wire both ways: the detectors decode events themselves (msgspec).
        # The scoring agent reads mail.events as producers keyed it (by list, by sender or not at all) and the
        # by-list topic, where each list's share of a message reaches the worker that owns the list.
        self.events_topic = app.topic(EVENTS_TOPIC, self.by_list_name, partitions=settings.partitions,
                                      schema=RawSchema())
        self.by_list = app.topic(self.by_list_name, partitions=settings.partitions, schema=RawSchema())
        self.dlq_topic = app.topic(DLQ_TOPIC, partitions=settings.partitions, schema=RawSchema())
        self.actions_topic = app.topic(ACTIONS_TOPIC, partitions=settings.partitions, schema=RawSchema())
        self.list_state_topic = app.topic(LIST_STATE_TOPIC, partitions=settings.partitions, schema=RawSchema())
        self.thread_watch_topic = app.topic(THREAD_WATCH_TOPIC, partitions=settings.partitions, schema=RawSchema())
        self.commands_topic = app.topic(COMMANDS_TOPIC, partitions=settings.partitions, schema=RawSchema())

        #: Every list's freeze state, changelog-backed: a restarted worker keeps every freeze.
        self.list_state = app.Table("list_state", default=None, partitions=settings.partitions,
                                    schema=faust.Schema(key_serializer="json", value_serializer="json"))
        #: Each list's learned model (velocity norm, threads, posters), so a restarted or
        #: surviving worker decides as the one that died would have. Pickled: this
        #: changelog must be writable only by Stormguard (see the threat model).
        self.list_models = app.Table("list_models", default=None, partitions=settings.partitions, key_type=str,
                                     value_type=bytes,
                                     schema=faust.Schema(key_serializer="json", value_serializer="raw"))

        #: How long a changed list model may wait before it is written to the changelog (seconds).
        self.model_save_s = settings.model_save_ms / 1000.0
        self.detector = StormDetector(settings.policy)
        self.ready = asyncio.Event()
        #: Lists whose model changed since it was last saved: the last record that changed it, and when
        #: (monotonic) the first unsaved change came. Oldest first, so saves are spread over the batches.
        self.unsaved: dict[str, tuple[Any, float]] = {}
        self.records_consumed = 0
        #: The last batch was backlog (:data:`CATCH_UP_S`): list models are saved at offset commits only.
        self.catching_up = False
        self.pending_commands: dict[str, asyncio.Future] = {}
        self._status_encoder = msgspec.json.Encoder()
        #: Why an agent died, if one did: /healthz answers 503 and the process exits (see :meth:`agent_died`).
        self.dead: dict[str, str] = {}
        #: A list's partition (of mail.events and the by-list topic alike), as Java's and Faust's partitioner
        #: picks it.
        self._home: dict[str, int] = {}
        #: A by-list partition's stand-in record, current while a share scored here writes its list's
        #: model and state: Faust's tables read only its topic and partition (:meth:`score_share_here`).
        self._share_writers: dict[int, RecordEvent] = {}
        self.dead_letter_failures = 0
        #: Wall-clock time the first event past the history cut-off was scored (None: still learning history).
        self.live_since: Optional[float] = None if settings.policy.learn_only_until else time.time()
        #: Freezes between two full collections of everything (about an hour at the default interval).
        self.gc_reclaim_every = max(1, round(3600 / settings.gc_freeze_s)) if settings.gc_freeze_s else 0
        self._gc_freezes = 0
        #: fewer, longer collections while a backlog is caught up (worker/heap.py)
        self.collector_pace = CollectorPace(settings.gc_catch_up_threshold)
        metrics.HISTORY_UNTIL.set(settings.policy.learn_only_until)
        metrics.LIVE.set(0 if self.live_since is None else 1)
        _declare(self)

    def _has_backlog(self, tp) -> bool:
        """Does the broker hold records of ``tp`` that this worker has not been handed yet?"""
        consumer = self.app.consumer._thread._ensure_consumer()  # the aiokafka consumer Faust runs
        state = consumer._subscription.subscription.assignment.state_value(tp)
        if state is None:
            return False
        if not state.has_valid_position:
            return True  # its position is being looked up: what it holds is not known yet
        end = consumer.last_stable_offset(tp) if consumer._isolation_level == "read_committed" \
            else consumer.highwater(tp)
        # no fetch answered yet: unknown, so waited for (the merge waits STORMGUARD_ORDER_WAIT_MS at most),
        # or a partition fetched later than the others at a start lets them run ahead of it
        return end is None or end > state.position

    # -- scoring ----------------------------------------------------------------------------
    async def score_batch(self, events: list) -> None:
        """Score one batch of records; publish what the detectors decide.

        A changed list's model is written to its changelog once it has waited
        ``STORMGUARD_MODEL_SAVE_MS``, not once per record (pickling and producing a
        busy list's model was the worker's biggest cost during a storm); each batch
        saves only the lists whose wait is over, so the saves are spread out
        instead of stalling the loop every interval; whatever is left is written
        when an offset commit starts (:class:`_SaveModelsBeforeCommit`). While a backlog is caught up (the
        batch's newest record older than :data:`CATCH_UP_S`) the commits alone save them: at tens of
        thousands of records a second, a list is then written once a commit instead of every
        ``STORMGUARD_MODEL_SAVE_MS``. Decisions are unchanged:
        records still reach the detector one at a time, in partition order, and
        every action, freezes included, is published as soon as its record is scored.
        """
        settings, detector, trace = self.settings, self.detector, self.trace
        now = time.monotonic()
        batch_start = time.time() if trace is not None else 0.0
        here = self._lists_owned_here() if self.local_shares else None
        local_shares = 0
        # what the metrics need of the batch, once per batch (metrics.observe_events)
        produced: list = []  # Kafka timestamps of the records read here
        scored: list = []  # their events, scored or routed
        acted: list = []  # (actions, produced at) of records that had actions
        errors: list = []  # the reason each dead-lettered record was refused
        # looked up once a batch, not once a record
        by_list_name, unsaved, home = self.by_list_name, self.unsaved, self._home
        score_here, process_decoded, process = self.score_here, self.process_raw_event, detector.process
        timings: list = []  # each record's detection time, for its histogram, once per batch
        observe_processing, read_here, score = timings.append, produced.append, scored.append
        crash_on = settings.crash_on_message_id
        # the batch path's records (faust_tuning.RecordEvent) are their own message and carry what the merge
        # decoded; a stream's Faust events (exactly-once, STORMGUARD_FAST_DRAIN=false) are read through .message
        records = bool(events) and type(events[0]) is RecordEvent
        for index, event in enumerate(events):
            if records:
                topic, produced_at, decoded = event.topic, event.timestamp or None, event.decoded
            else:
                message = event.message
                topic, produced_at, decoded = message.topic, message.timestamp, getattr(event, "decoded", None)
                produced_at = float(produced_at) if produced_at else None  # epoch seconds, as Faust gives them
            if decoded is None:
                decoded = decode_record(event.value)[1]
            by_list = topic == by_list_name
            local = away = ()
            if not by_list and type(decoded) is MailEvent and not decoded.lists:
                # Most mail (nine records in ten): scored where it is read, and nothing made for it unless it
                # has actions; the rest of the loop is for list posts and records that cannot be scored.
                started = perf_counter()
                try:
                    actions = process(decoded)
                except InvalidEvent as exc:  # late or far ahead: dead-lettered below
                    outcome = refused(exc)
                else:
                    observe_processing(perf_counter() - started)
                    if produced_at is not None:
                        read_here(produced_at)
                    score(decoded)
                    if crash_on and decoded.message_id == crash_on:
                        raise RuntimeError(f"STORMGUARD_CRASH_ON_MESSAGE_ID drill: {crash_on}")
                    if actions:
                        acted.append((actions, produced_at))
                        await self.publish_decisions(event, Outcome(actions, None, decoded), event, index,
                                                     len(events), batch_start)
                    continue
            else:
                started = perf_counter()
                if by_list:  # one list's share, routed here because we own the list
                    share = event.key.decode("utf-8", "replace") if isinstance(event.key, bytes) else ""
                    outcome = process_decoded(decoded, (share,))
                else:
                    outcome, away = score_here(decoded, event.key, event.message.partition)
                    if away and here:
                        local = tuple(address for address in away if home[address] in here)
            observe_processing(perf_counter() - started)
            if crash_on and outcome.event is not None and outcome.event.message_id == crash_on:
                raise RuntimeError(f"STORMGUARD_CRASH_ON_MESSAGE_ID drill: {crash_on}")
            if outcome.error is not None:
                await self.dead_letter(event, outcome.error)
            elif away:  # every list of the message is scored by its owner: this record changed no list here
                for address in away:
                    if address in local:
                        continue
                    # stamped as the gateway stamped it: produce -> action stays the gateway's latency
                    await self.by_list.send(key=address.encode(), value=_value_bytes(event),
                                            partition=home[address], headers=event.headers, timestamp=produced_at)
            else:
                # a share changed its own list only: another list of the message, saved with this record,
                # would go to this list's changelog partition, where its owner does not look for it
                for address in ((share,) if by_list else outcome.event.lists):
                    waiting = unsaved.get(address)
                    unsaved[address] = (event, now if waiting is None else waiting[1])
            if outcome.actions:
                await self.publish_decisions(event, outcome, event, index, len(events), batch_start)
            if by_list:  # the message was counted where it was read
                for action in outcome.actions:
                    metrics.observe_action(action, produced_at)
            else:
                if produced_at is not None:
                    read_here(produced_at)
                if outcome.error is None:
                    score(outcome.event)
                if outcome.actions:
                    acted.append((outcome.actions, produced_at))
            if outcome.error is not None:
                errors.append(outcome.error)
            if local:
                for address in local:
                    await self.score_share_here(event, outcome.event, address, now)
                local_shares += len(local)
        metrics.observe_events(detector, produced, scored, acted, errors)
        metrics.PROCESSING_SECONDS.observe_many(timings)
        # a share scored here counts as the by-list record it would have been
        self.records_consumed += local_shares
        self.records_consumed += len(events)  # scored, routed or dead-lettered
        if self.live_since is None:
            self._note_history()
        _current_event.set(None)
        # Catching up, nobody waits on these records: each changed model waits for the next offset commit,
        # which writes them all (_SaveModelsBeforeCommit), once per list rather than every model_save_ms.
        newest = _record_time(events[-1]) if events else None
        self.catching_up = newest is not None and time.time() - newest > CATCH_UP_S
        self.collector_pace.follow(self.catching_up)
        if not self.catching_up:
            self.save_models(changed_before=time.monotonic() - self.model_save_s)

    def _lists_owned_here(self) -> frozenset:
        """Partitions of the by-list topic this worker reads now: the lists it owns."""
        try:
            assigned = self.app.consumer.assignment()
        except Exception:  # not started, or between rebalances: send every share through the broker
            return frozenset()
        name = self.by_list_name
        return frozenset(tp.partition for tp in assigned if tp.topic == name)

    async def score_share_here(self, source, event: MailEvent, address: str, now: float) -> None:
        """Score one list's share of ``source`` (a record of mail.events) here: this worker owns the list.

        What reading the share back from the by-list topic would do, without the trip through the
        broker: the same detector call, in the merge's order (the share has its message's event time,
        which the merge has just reached). Its writes are made as the by-list record's would be: list
        models and list state go to the changelog partition of the list's by-list partition, so the
        worker that owns that partition after a rebalance restores them; the offset of ``source``, and
        the changed models (written before each commit), keep it at least once, as a share sent and
        read back is.
        """
        share = self._share_writers.get(self._home[address])
        if share is None:
            share = self._share_writer(self._home[address])
        outcome = self.process_raw_event(event, (address,))
        if outcome.error is not None:
            await self.dead_letter(source, outcome.error)
            metrics.observe_event(self.detector, outcome, None)
            return
        waiting = self.unsaved.get(address)
        self.unsaved[address] = (share, now if waiting is None else waiting[1])
        if outcome.actions:
            await self.publish_decisions(share, outcome, source)  # traced as its source record
            for action in outcome.actions:
                metrics.observe_action(action, _record_time(source))

    def _share_writer(self, partition: int) -> RecordEvent:
        writer = self._share_writers[partition] = RecordEvent(self.by_list_name, partition, -1, None, None, b"", (),
                                                              TP(self.by_list_name, partition))
        return writer

    async def publish_decisions(self, writes_as, outcome: Outcome, traced, index: int = 0, batch_len: int = 1,
                                batch_start: Optional[float] = None) -> None:
        """Publish a scored record's actions, and let the producer put them on the wire now.

        ``writes_as`` is the record whose partition the table writes go to (the record itself, or the
        by-list share a list post stands in for when it is scored here); ``traced`` is the record a
        freeze's latency trace times (``STORMGUARD_LATENCY_TRACE``), ``index`` its place in a batch of
        ``batch_len`` that started at ``batch_start``.
        """
        # Tables partition their changelog by the record being processed (a freeze writes list_state).
        _current_event.set(weakref.ref(writes_as))
        trace = self.trace
        scored = time.time() if trace is not None else 0.0
        for action in outcome.actions:
            sent = await self.publish(action)
            if trace is not None and action.kind == "freeze":
                trace.freeze(traced, outcome, index, batch_len, scored if batch_start is None else batch_start,
                             scored, sent)
        # The producer sends from this event loop: let it put the decision on the wire now rather than after
        # the rest of the batch is scored (its send task starts on the third turn of the loop).
        for _ in range(HAND_OVER_TURNS):
            await asyncio.sleep(0)

    def _note_history(self) -> None:
        detector, settings = self.detector, self.settings
        metrics.HISTORY_LEARNED.set(detector.history_learned)
        if detector.watermark is not None and detector.watermark > settings.policy.learn_only_until:
            self.live_since = time.time()
            metrics.LIVE.set(1)
            log.warning("learned %d event(s) of history (up to event time %.0f); live from now on",
                        detector.history_learned, settings.policy.learn_only_until)

    def _partition_of(self, address: str) -> int:
        home = self._home.get(address)
        if home is None:
            if len(self._home) > 100_000:
                self._home.clear()
            home = self._home[address] = (murmur2(address.encode()) & 0x7FFFFFFF) % self.settings.partitions
        return home

    def score_here(self, raw: "bytes | MailEvent | InvalidEvent", key: Any, partition: int):
        """Score a record of mail.events here, or name the lists whose shares must be routed.

        A list is owned by partition ``murmur2(list) % partitions`` of the by-list topic (Java's and
        Faust's partitioner). A post to one list, keyed by that list and on that partition (``replay``,
        ``ingest``, any Java-partitioned producer keying by list), is scored where it is: no extra hop.
        Every other list post (keyed by sender, unkeyed, another partitioner, a message to several
        lists) goes to the by-list topic, one share per list, so that all of a list's posts reach the
        one worker that owns it in one partition, in the order this worker read them (oldest first,
        :mod:`stream_jobs.worker.event_order`). Mail to no list is scored where it is read.
        """
        event = decode_record(raw)[1] if isinstance(raw, bytes) else raw
        if isinstance(event, InvalidEvent):
            return refused(event), ()
        if self.settings.partitions == 1:
            return self.process_raw_event(event), ()
        lists = event.lists
        if not lists:
            return self.process_raw_event(event), ()
        if len(lists) == 1:
            (address,) = lists
            if key == address.encode() and self._partition_of(address) == partition:
                return self.process_raw_event(event), ()
        away = tuple(sorted(lists))
        for address in away:
            self._partition_of(address)
        return Outcome([], None, event), away

    def process_raw_event(self, event, lists=None) -> Outcome:
        if isinstance(event, InvalidEvent):  # as decode_record hands it on
            return refused(event)
        try:
            return Outcome(self.detector.process(event, lists), None, event)
        except InvalidEvent as exc:
            return refused(exc)

    def agent_died(self, agent: str, exc: BaseException) -> None:
        """An agent that stops scoring must not look healthy: /healthz turns 503 now, and the process exits
        non-zero in a moment, so that systemd, Kubernetes or Compose restart it (from the committed offsets)."""
        if isinstance(exc, asyncio.CancelledError):
            return
        self.dead[agent] = f"{exc.__class__.__name__}: {exc}"
        log.critical("agent %s died (%r); /healthz answers 503 and the worker exits in %.0f s",
                     agent, exc, EXIT_AFTER_DEATH_S)
        metrics.AGENT_DEATHS.labels(agent=agent).inc()

        def _exit() -> None:
            logging.shutdown()
            os._exit(70)  # EX_SOFTWARE; Faust would otherwise restart the agent on a stream that has moved on

        asyncio.get_running_loop().call_later(EXIT_AFTER_DEATH_S, _exit)

    async def apply_command(self, command) -> None:
        """One operator's freeze or unfreeze from the admin API."""
        cmd: dict = {}
        try:
            decoded = msgspec.json.decode(command)
            if not isinstance(decoded, dict):
                raise TypeError("a command is a JSON object")
            cmd = decoded
            action = self.detector.operator_action(cmd["kind"], cmd["list"], float(cmd["at"]), str(cmd["actor"]),
                                                   str(cmd["reason"]))
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            # Only the admin API writes here; anything else is refused, loudly, and skipped.
            log.warning("refused an operator command: %s", exc)
            action, error = None, str(exc)
        else:
            error = None
            if action is not None:
                await self.publish(action)
                metrics.observe_action(action)
        future = self.pending_commands.pop(cmd.get("id"), None)
        if future is not None and not future.done():
            future.set_result((action, error))

    async def freeze_heap(self) -> None:
        """Keep Python's full collections short: they scan only what was allocated since the last freeze.

        The detector's state (a model per sender and per list) is long-lived and has no reference
        cycles: it is freed by reference counting when evicted, frozen or not. What a freeze can
        strand is other cyclic garbage alive at that instant, so once an hour everything is
        unfrozen and collected.
        """
        self._gc_freezes += 1
        if self._gc_freezes % self.gc_reclaim_every == 0:
            gc.unfreeze()
            gc.collect()
        gc.freeze()

    # -- effects ----------------------------------------------------------------------------
    async def publish(self, action: Action) -> Any:
        """Publish a decision (and, for a freeze, the list's new state); the action record's delivery future."""
        key = (action.list or action.sender or "").encode()
        if not self.settings.enforce and action.actor == "stormguard":
            action = shadow(action)
        if action.enforced and action.kind in ("freeze", "unfreeze") and action.list:
            status = self.detector.list_status(action.list)
            self.list_state[action.list] = msgspec.structs.asdict(status)
            await self.list_state_topic.send(key=key, value=self._status_encoder.encode(status))
        if action.enforced and action.thread is not None and action.list:
            # before the action itself: a gateway that holds threads (stormguard milter) follows this topic
            await self.thread_watch_topic.send(key=f"{action.list} {action.thread.root}".encode(),
                                               value=thread_watch_record(action))
        return await self.actions_topic.send(key=key, value=encode_action(action))

    async def dead_letter(self, event, reason: str) -> None:
        """Keep the raw bytes and say why: an operator can fix and replay them.

        A dead letter that cannot be written is counted and logged; it never stops scoring.
        """
        msg = event.message
        raw = _value_bytes(event)
        source = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
                  "timestamp": _record_time(event)}
        value = dead_letter_envelope(raw, reason, source, self.settings.dlq_max_bytes)
        log.warning("dead-lettered %s/%s@%s: %s", msg.topic, msg.partition, msg.offset, reason)
        try:
            await self.dlq_topic.send(
                key=event.key if isinstance(event.key, bytes) and len(event.key) < 4096 else None,
                value=value, headers=[("stormguard-reason", reason.encode()[:1024])],
                callback=self._dead_letter_sent)
        except Exception as exc:
            self.dead_letter_failures += 1
            metrics.DEAD_LETTER_FAILURES.inc()
            log.error("could not write the dead letter of %s/%s@%s (%r); the record is skipped",
                      msg.topic, msg.partition, msg.offset, exc)

    def _dead_letter_sent(self, fut) -> None:
        try:
            exc = fut.exception() if hasattr(fut, "exception") else None
        except Exception as error:  # cancelled
            exc = error
        if exc is not None:
            self.dead_letter_failures += 1
            metrics.DEAD_LETTER_FAILURES.inc()
            log.error("the broker refused a dead letter: %r", exc)

    def save_models(self, changed_before: Optional[float] = None) -> None:
        """Write changed list models, oldest change first, each partitioned by the last record that changed it.

        With ``changed_before`` (a monotonic time), only the lists whose first unsaved change is
        older; without, all of them.
        """
        unsaved, detector = self.unsaved, self.detector
        if not unsaved:
            return
        previous = _current_event.get(None)
        last_saved = None  # held here: the table write below needs its record alive (a weak reference)
        try:
            while unsaved:
                address, (event, since) = next(iter(unsaved.items()))
                if changed_before is not None and since > changed_before:
                    break
                state = detector.lists.get(address)
                _current_event.set(weakref.ref(event))
                if state is not None:
                    self.list_models[address] = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
                del unsaved[address]
                last_saved = event
            if last_saved is not None:
                _current_event.set(weakref.ref(last_saved))
                self.list_models[_META_KEY] = msgspec.json.encode({"events_seen": detector.events_seen,
                                                                   "watermark": detector.watermark,
                                                                   "largest_list": detector.largest_list})
        finally:
            _current_event.set(previous)

    def save_models_or_warn(self, when: str, changed_before: Optional[float] = None) -> None:
        """:meth:`save_models`, where a failure must not stop the caller: what is not saved stays in
        ``unsaved`` for the next batch, tick or commit (on the way out, the producer may be gone)."""
        try:
            self.save_models(changed_before)
        except Exception as exc:
            log.warning("could not save %d list model(s) %s: %r", len(self.unsaved), when, exc)

    def restore_state(self) -> None:
        """Adopt lists from the changelog tables that this worker's detector does not know yet."""
        detector = self.detector
        adopted = 0
        for address, blob in list(self.list_models.items()):
            if not blob:
                continue
            if address == _META_KEY:
                meta = msgspec.json.decode(blob)
                detector.events_seen = max(detector.events_seen, meta["events_seen"])
                detector.largest_list = max(detector.largest_list, meta.get("largest_list", 0))
                if meta["watermark"] is not None and (detector.watermark is None
                                                      or meta["watermark"] > detector.watermark):
                    detector.watermark = meta["watermark"]
            elif address not in detector.lists:
                try:
                    state = detector.lists[address] = pickle.loads(blob)
                    adopted += 1
                    if state.frozen:
                        detector.restore(state.status())
                except Exception as exc:  # a model from an incompatible version: re-learn it
                    log.warning("could not restore the model of %s (%s); it will be re-learned", address, exc)
        frozen = 0
        for address, value in list(self.list_state.items()):
            if value and value.get("frozen") and not detector.list_status(address).frozen:
                detector.restore(msgspec.convert(value, ListStatus))
                frozen += 1
        if adopted or frozen:
            log.warning("restored %d list model(s) and %d freeze(s) from the changelogs", adopted, frozen)

    # -- what the web views show ---------------------------------------------------------------
    def status_of(self, address: str) -> ListStatus:
        status = self.enforced(self.detector.list_status(address))
        if not status.frozen:
            stored = self.list_state.get(address)
            if stored and stored.get("frozen"):
                return msgspec.convert(stored, ListStatus)
        return status

    def enforced(self, status: ListStatus) -> ListStatus:
        """What gateways and operators are told: in shadow mode, Stormguard's own freezes are not freezes."""
        if status.frozen and not self.settings.enforce and status.actor == "stormguard":
            return ListStatus(list=status.list, frozen=False)
        return status


def _declare(worker: StormguardWorker) -> None:
    """The app's agents, timers, sensor, signal handlers and web views, each a few lines around ``worker``."""
    app, settings, detector = worker.app, worker.settings, worker.detector

    # -- agents -------------------------------------------------------------------------------
    if app.fast_drain and app.scoring is None:
        # each fetched batch straight to the scorer, acked per batch (faust_tuning.BatchConsumer); exactly-once
        # keeps the stream agent below, whose commit lock keeps a batch and its writes in one transaction
        @app.batch_agent(worker.events_topic, name=f"{_NAME}.score", max_records=BATCH_MAX)
        async def score_fetched(events: list) -> None:
            """Score a batch of records as the consumer fetched them (:meth:`StormguardWorker.score_batch`)."""
            try:
                await worker.score_batch(events)
            except Exception as exc:
                worker.agent_died("score", exc)
                raise

        @app.on_before_shutdown.connect
        async def _save_on_the_way_out(sender: Any = None, **kwargs: Any) -> None:
            worker.save_models_or_warn("on the way out")  # stopping or restarting: what was learned is kept
    else:
        @app.agent(worker.events_topic, name=f"{_NAME}.score")
        async def score(stream):
            """Score every submitted message; publish what the detectors decide (:meth:`StormguardWorker.score_batch`)."""
            worker.restore_state()
            scoring = app.scoring  # exactly-once: no commit in the middle of a batch (faust_tuning.SourceTransactions)
            try:
                async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN):
                    if scoring is None:
                        await worker.score_batch(events)
                        continue
                    async with scoring:
                        await worker.score_batch(events)
                        for event in events:  # the commit that follows carries this batch's offsets and writes
                            await stream.ack(event)
            except Exception as exc:
                worker.agent_died("score", exc)
                raise
            finally:
                worker.save_models_or_warn("on the way out")  # stopping or restarting: what was learned is kept

    @app.agent(worker.commands_topic, name=f"{_NAME}.operate")
    async def operate(stream):
        """Apply operators' freezes and unfreezes from the admin API, in stream order."""
        scoring = app.scoring
        try:
            async for event in stream.events():
                if scoring is None:
                    await worker.apply_command(event.value)
                    continue
                async with scoring:
                    await worker.apply_command(event.value)
                    await stream.ack(event)
        except Exception as exc:
            worker.agent_died("operate", exc)
            raise

    # -- timers, sensor, rebalances ---------------------------------------------------------------
    @app.timer(max(worker.model_save_s / 2, 0.05), name=f"{_NAME}.save_idle_models")
    async def save_idle_models() -> None:
        """Traffic stopped: save what the last batches taught, without waiting for the next record."""
        if worker.unsaved and not worker.catching_up:
            worker.save_models_or_warn("on the timer", changed_before=time.monotonic() - worker.model_save_s)

    app.sensors.add(_SaveModelsBeforeCommit(worker))

    @app.on_partitions_revoked.connect
    async def _on_revoked(sender: Any = None, *args: Any, **kwargs: Any) -> None:
        # The next owner of these partitions adopts the models from the changelog.
        worker.save_models()

    if settings.gc_freeze_s:
        app.timer(settings.gc_freeze_s, name=f"{_NAME}._freeze_heap")(worker.freeze_heap)

    metrics.READY.set_function(lambda: 1.0 if worker.ready.is_set() and not worker.dead else 0.0)

    @app.timer(1.0, name=f"{_NAME}.observe_consumer")
    async def observe_consumer() -> None:
        metrics.observe_consumer(app)

    @app.on_rebalance_complete.connect
    async def _on_ready(sender: Any = None, **kwargs: Any) -> None:
        # Partitions a dead worker held are ours now: adopt the lists it knew.
        worker.restore_state()
        if settings.gc_freeze_s:
            gc.collect()  # once, at start-up: what imports and restoring left behind
            gc.freeze()
        worker.ready.set()

    # -- web ----------------------------------------------------------------------------------
    @app.page("/healthz")
    async def healthz(web, request):
        if worker.dead:
            return web.json({"status": "dead", "dead_agents": dict(worker.dead)}, status=503)
        if not worker.ready.is_set():
            return web.json({"status": "starting"}, status=503)
        scheduler = getattr(app.consumer, "scheduler", None)
        return web.json({"status": "ok", "records": worker.records_consumed, "events_seen": detector.events_seen,
                         "frozen_lists": len(detector.frozen_lists()), "partitions": settings.partitions,
                         "history": {"learn_only_until": settings.policy.learn_only_until or None,
                                     "events_learned": detector.history_learned,
                                     "live": worker.live_since is not None, "live_since": worker.live_since},
                         "dead_letter_failures": worker.dead_letter_failures,
                         "catching_up": worker.catching_up,
                         "held_for_order": getattr(scheduler, "held", 0),
                         "released_out_of_order": getattr(scheduler, "released_early", 0)})

    @app.page("/metrics")
    async def prometheus_metrics(web, request):
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/api/lists")
    async def frozen_lists(web, request):
        frozen = detector.frozen_lists()
        body = {"frozen": [_status_json(s) for s in frozen if worker.enforced(s).frozen]}
        if not settings.enforce:
            body["would_freeze"] = [_status_json(s) for s in frozen if not worker.enforced(s).frozen]
        return web.json(body)

    @app.page("/api/lists/{address}")
    async def list_view(web, request, address: str):
        return web.json(_status_json(worker.status_of(address)))

    @app.page("/api/lists/{address}/{verb}")
    class ListCommand(faust.web.View):
        """POST /api/lists/{address}/freeze|unfreeze: operators act, as themselves, with a reason."""

        async def post(self, request, address: str, verb: str):
            token = secret("STORMGUARD_ADMIN_TOKEN")
            if not token:
                return self.json({"error": "admin API disabled: set STORMGUARD_ADMIN_TOKEN"}, status=403)
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return self.json({"error": "missing or wrong bearer token"}, status=401)
            if verb not in ("freeze", "unfreeze"):
                return self.json({"error": f"unknown action {verb!r}: use freeze or unfreeze"}, status=404)
            try:
                body = await request.json() if request.can_read_body else {}
            except ValueError:
                return self.json({"error": "body is not JSON"}, status=400)
            if not isinstance(body, dict):
                return self.json({"error": "body must be a JSON object"}, status=400)
            actor = str(body.get("actor") or "operator")[:200]
            reason = str(body.get("reason") or f"{verb} by {actor}")[:1000]
            command = {"id": uuid.uuid4().hex, "kind": verb, "list": address, "actor": actor, "reason": reason,
                       "at": time.time()}
            future = asyncio.get_running_loop().create_future()
            worker.pending_commands[command["id"]] = future
            await worker.commands_topic.send(key=address.encode(), value=msgspec.json.encode(command))
            try:
                action, error = await asyncio.wait_for(future, timeout=10.0)
            except asyncio.TimeoutError:
                worker.pending_commands.pop(command["id"], None)
                return self.json({"error": "accepted, but not applied within 10 s; check /api/lists"}, status=202)
            if error:
                return self.json({"error": error}, status=400)
            return self.json({"applied": action is not None, "status": _status_json(worker.status_of(address))})


class _SaveModelsBeforeCommit(Sensor):
    """Write every changed list model when an offset commit starts.

    Faust calls this at the start of each commit, and flushes its producer
    before it commits the offsets, so the changelog holds everything learned
    from the records whose offsets are committed: a worker that dies loses no
    learning, and the one that takes its partitions over re-reads only records
    it has not learned from (the detector ignores redelivered list posts).
    """

    def __init__(self, worker: StormguardWorker, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker = worker

    def on_commit_initiated(self, consumer: Any) -> None:
        if self.worker.unsaved:
            self.worker.save_models_or_warn("before a commit")


def dead_letter_envelope(raw: bytes, reason: str, source: dict, max_bytes: int) -> bytes:
    """The dead-letter record: the raw bytes and why, always small enough for the broker to take.

    A record too big to copy whole keeps a prefix (``raw_truncated``), with the original's length and
    SHA-256, so an operator can still find and identify it upstream.

    >>> env = msgspec.json.decode(dead_letter_envelope(b"x" * 10_000, "too big", {}, 4096))
    >>> env["raw_truncated"], env["raw_length"], len(base64.b64decode(env["raw_base64"])) < 4096
    (True, 10000, True)
    """
    envelope = {"reason": reason[:2000], "raw_base64": "", "raw_length": len(raw),
                "raw_sha256": hashlib.sha256(raw).hexdigest(), "raw_truncated": False, "source": source}
    room = max_bytes - len(msgspec.json.encode(envelope)) - 16
    keep = len(raw) if 4 * -(-len(raw) // 3) <= room else max(0, room // 4 * 3)
    envelope["raw_base64"] = base64.b64encode(raw[:keep]).decode()
    envelope["raw_truncated"] = keep < len(raw)
    return msgspec.json.encode(envelope)


def thread_watch_record(action: Action) -> bytes:
    """The ``stormguard.thread-watch`` record of an action that holds a thread.

    >>> from detectors.policy import ThreadHold
    >>> a = Action(kind="alert", list="all@nhs.net", sender="x@nhs.net", event_time=10.0, detector="fanout",
    ...            score=9.0, message_id="<t0@x>", reason="r", thread=ThreadHold(root="<t0@x>", ids=["<t0@x>"],
    ...            until=310.0))
    >>> r = msgspec.json.decode(thread_watch_record(a))
    >>> r["list"], r["root"], r["ids"], r["until"], r["storm"]
    ('all@nhs.net', '<t0@x>', ['<t0@x>'], 310.0, False)
    """
    thread = action.thread
    assert thread is not None and action.list
    return msgspec.json.encode({"list": action.list, "root": thread.root, "ids": thread.ids, "until": thread.until,
                                "since": action.event_time, "storm": action.kind == "freeze",
                                "detector": action.detector, "reason": action.reason, "actor": action.actor,
                                "action_id": action.action_id})


def decode_record(raw: Any) -> tuple[float, Any]:
    """A record's event time and its event decoded (a :class:`MailEvent`), or the :class:`InvalidEvent` that
    says why it is not one: the event-time merge decodes each record once, and the scorer takes that on.

    >>> decode_record(b'{"message_id": "m", "timestamp": 5, "sender": "a@x", "recipients": ["b@x"]}')[0]
    5.0
    >>> t, why = decode_record(b'{"timestamp": 7}'); t, type(why).__name__
    (7.0, 'InvalidEvent')
    """
    if type(raw) is not bytes:
        raw = bytes(raw or b"")
    try:
        event = parse_event(raw)
    except InvalidEvent as exc:
        return event_time_of(raw), exc  # still placed by its timestamp, if it has one, as before
    ts = event.timestamp  # epoch seconds, nearly always: event_time's property call saved
    return (ts if type(ts) is float else event.event_time), event


def _value_bytes(event) -> bytes:
    raw = event.value
    return raw if isinstance(raw, bytes) else bytes(raw or b"")


def _record_time(event) -> Optional[float]:
    ts = getattr(event.message, "timestamp", None)  # Faust gives epoch seconds
    return float(ts) if ts else None


def _status_json(status: ListStatus) -> dict:
    return {"list": status.list, "frozen": status.frozen, "since": status.since, "reason": status.reason,
            "until": status.until, "actor": status.actor}
