"""Prometheus metrics of the worker, served on ``GET /metrics``.

The worker calls two hooks and nothing else:

* :func:`observe_events` after every batch of records it consumed (scored or dead-lettered;
  :func:`observe_event` is the same for one record);
* :func:`observe_consumer` from a 1-second timer (consumer lag, gauges).

Issue 4's delivery code (webhooks, Grafana annotations, Mailman) uses
:data:`OUTBOX_BACKLOG` and :data:`DELIVERY_FAILURES` directly.

Label cardinality is bounded on purpose. No metric is labelled by sender or
message. Per-list series (``stormguard_list_*{list}``) exist only for the
``STORMGUARD_METRICS_TOP_LISTS`` busiest lists (by deliveries per minute, see
:class:`TopLists`) plus up to ``STORMGUARD_METRICS_MAX_FROZEN_LISTS`` frozen
lists; they are computed at scrape time, so a list that drops out of the top
simply stops being exported. Invalid-record reasons are folded into a handful
of categories (:func:`reason_category`), never the free-text reason.

docs/observability.md lists every metric with its meaning.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from detectors.engine import FREEZE_CAP_MARK
from stream_jobs.settings import EVENTS_TOPIC

log = logging.getLogger("stormguard.metrics")


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, raw, default)
        return default
    return min(max(value, low), high)


#: How many of the busiest lists get per-list series (hard cap 200).
TOP_LISTS = _env_int("STORMGUARD_METRICS_TOP_LISTS", 20, 0, 200)
#: Frozen lists exported per list besides the busiest ones (hard cap 500).
MAX_FROZEN_LISTS = _env_int("STORMGUARD_METRICS_MAX_FROZEN_LISTS", 50, 0, 500)
#: Lists whose rates are tracked to find the busiest (memory bound of TopLists).
TOP_LISTS_CAPACITY = 4096
#: Event-time seconds over which per-list rates decay (so they read "per minute").
RATE_TAU = 60.0

#: Folded reasons for ``stormguard_events_invalid_total{reason}``.
INVALID_REASONS = ("not_json", "schema", "encoding", "oversize", "timestamp", "late", "future", "other")
#: Sinks of issue 4's delivery (``stormguard_delivery_failures_total{sink}``), pre-created at zero.
SINKS = ("alertmanager", "webhook", "grafana", "mailman")
#: Known (kind, detector) pairs, pre-created at zero so rates exist before the first storm.
KNOWN_ACTIONS = (("alert", "fanout"), ("alert", "reply_velocity"), ("alert", "reply_to_anomalous_post"),
                 ("freeze", "reply_to_anomalous_post"), ("freeze", "reply_velocity"),
                 ("freeze", "operator"), ("unfreeze", "operator"), ("unfreeze", "cooldown"))

REGISTRY = CollectorRegistry(auto_describe=True)


class RecordHistogram(Collector):
    """A histogram observed once per record: ``observe`` is one bisect and two additions.

    prometheus_client's ``Histogram`` takes a lock and walks its buckets on
    every observation; three of them per record were a tenth of the worker's
    time. The worker's event loop is the only writer, and scrapes run on the
    same loop, so no lock is needed. Exposed exactly as a ``Histogram`` is
    (``_bucket{le}``, ``_count``, ``_sum``).

    >>> r = CollectorRegistry()
    >>> h = RecordHistogram("demo_seconds", "Demo", (0.1, 1.0, float("inf")), registry=r)
    >>> for v in (0.05, 0.1, 0.5, 7.0):
    ...     h.observe(v)
    >>> [(s.labels["le"], s.value) for s in next(iter(r.collect())).samples if s.name.endswith("_bucket")]
    [('0.1', 2), ('1.0', 3), ('+Inf', 4)]
    >>> r.get_sample_value("demo_seconds_sum")
    7.65
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float],
                 registry: Optional[CollectorRegistry] = None):
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(b for b in buckets if b != float("inf"))
        self.counts = [0] * (len(self.bounds) + 1)  # the last is (largest bound, +Inf]
        self.sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: list) -> None:
        """:meth:`observe` each of ``values`` (a batch's, in any order): one sort and a bisect per bucket.
        A value below zero (an age, with two clocks a little apart) is observed as zero.

        >>> h = RecordHistogram("demo_many", "Demo", (0.1, 1.0))
        >>> h.observe_many([7.0, 0.1, 0.5, 0.05, -0.25]); h.counts, h.sum
        ([3, 1, 1], 7.65)
        """
        if not values:
            return
        values = sorted(values)
        if values[0] < 0.0:  # clocks a little apart: observed as 0, as observe(max(0.0, v)) would
            zero = bisect.bisect_left(values, 0.0)
            values[:zero] = [0.0] * zero
        counts, below = self.counts, 0
        for i, bound in enumerate(self.bounds):
            upto = bisect.bisect_right(values, bound)  # values <= bound: bucket i, as bisect_left places them
            counts[i] += upto - below
            below = upto
        counts[-1] += len(values) - below
        self.sum += sum(values)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds + [float("inf")], self.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class RecordCounter(Collector):
    """A counter bumped once per record: ``inc`` is one addition (see :class:`RecordHistogram`).

    >>> r = CollectorRegistry()
    >>> c = RecordCounter("demo_events", "Demo", registry=r)
    >>> c.inc(); c.inc(41)
    >>> r.get_sample_value("demo_events_total")
    42.0
    """

    def __init__(self, name: str, documentation: str, registry: Optional[CollectorRegistry] = None):
        self.name = name
        self.documentation = documentation
        self.value = 0.0
        if registry is not None:
            registry.register(self)

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


# -- traffic ------------------------------------------------------------------------------------
EVENTS_PROCESSED = RecordCounter("stormguard_events_processed", "Events scored by the detectors (valid records)",
                                 registry=REGISTRY)
EVENTS_INVALID = Counter("stormguard_events_invalid",
                         "Records dead-lettered to mail.events.dlq, by folded reason", ["reason"],
                         registry=REGISTRY)
DELIVERIES = RecordCounter("stormguard_deliveries",
                           "Mailbox deliveries of the scored events (after list expansion)", registry=REGISTRY)
REPLIES = RecordCounter("stormguard_list_replies",
                        "Scored events that are replies to at least one list (reply-alls)", registry=REGISTRY)

DEAD_LETTER_FAILURES = Counter("stormguard_dead_letter_failures",
                               "Dead letters that could not be written to mail.events.dlq (the record was skipped)",
                               registry=REGISTRY)
HISTORY_LEARNED = Gauge("stormguard_history_events_learned",
                        "Events learned as history at the first start (learned from, never acted on)",
                        registry=REGISTRY)
HISTORY_UNTIL = Gauge("stormguard_history_learn_only_until_seconds",
                      "Event time up to which mail.events is history (0: none)", registry=REGISTRY)
LIVE = Gauge("stormguard_live", "1 once the worker acts on events (history learned), else 0", registry=REGISTRY)
READY = Gauge("stormguard_ready", "1 while this process's GET /healthz answers 200 (consuming), else 0",
              registry=REGISTRY)
AGENT_DEATHS = Counter("stormguard_agent_deaths", "Agents that died (the worker exits right after)", ["agent"],
                       registry=REGISTRY)

# -- decisions ------------------------------------------------------------------------------------
ACTIONS = Counter("stormguard_actions", "Actions published to stormguard.actions", ["kind", "detector"],
                  registry=REGISTRY)
FREEZES_CAPPED = Counter("stormguard_freezes_capped",
                         "Freezes refused because STORMGUARD_MAX_FREEZES_PER_HOUR was reached (published as alerts)",
                         registry=REGISTRY)
FROZEN_LISTS = Gauge("stormguard_frozen_lists", "Lists frozen right now (in this worker's partitions)",
                     registry=REGISTRY)
TRACKED_SENDERS = Gauge("stormguard_tracked_senders", "Senders with a learned baseline", registry=REGISTRY)
TRACKED_LISTS = Gauge("stormguard_tracked_lists", "Lists with a learned baseline", registry=REGISTRY)
WATERMARK = Gauge("stormguard_event_time_watermark_seconds",
                  "Newest event time seen by the detectors (epoch seconds)", registry=REGISTRY)

# -- latency --------------------------------------------------------------------------------------
EVENT_TIME_LAG = RecordHistogram(
    "stormguard_event_time_lag_seconds", "Worker clock minus the event's own timestamp when scored",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 21600, 86400, float("inf")),
    registry=REGISTRY)
RECORD_LATENCY = RecordHistogram(
    "stormguard_record_latency_seconds", "Kafka record timestamp (produce) to scored by the worker",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf")),
    registry=REGISTRY)
SCORING_LATENCY = Histogram(
    "stormguard_produce_to_action_seconds", "Kafka record timestamp (produce) to action published",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")), registry=REGISTRY)
PROCESSING_SECONDS = RecordHistogram(
    "stormguard_processing_seconds", "Time the detectors spend on one event",
    buckets=(0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.1, float("inf")),
    registry=REGISTRY)

# -- delivery of actions (issue 4 updates these) ----------------------------------------------------
OUTBOX_BACKLOG = Gauge("stormguard_outbox_backlog",
                       "Actions waiting in the outbox for delivery to their sinks", registry=REGISTRY)
DELIVERY_FAILURES = Counter("stormguard_delivery_failures",
                            "Failed attempts to deliver an action to a sink", ["sink"], registry=REGISTRY)

for _reason in INVALID_REASONS:
    EVENTS_INVALID.labels(reason=_reason)
for _kind, _detector in KNOWN_ACTIONS:
    ACTIONS.labels(kind=_kind, detector=_detector)
for _sink in SINKS:
    DELIVERY_FAILURES.labels(sink=_sink)


def reason_category(error: str) -> str:
    """Fold a dead-letter reason (free text) into one of :data:`INVALID_REASONS`.

    >>> reason_category("JSON is malformed: invalid character (byte 0)")
    'not_json'
    >>> reason_category("Object missing required field `timestamp`")
    'schema'
    >>> reason_category("event is 900 s behind list all@nhs.net (max_lateness 300 s)")
    'late'
    """
    e = error.lower()
    if "json is malformed" in e or "input data was truncated" in e or "invalid utf-8" in e and "json" in e:
        return "not_json"
    if "not utf-8" in e:
        return "encoding"
    if "-byte limit" in e:
        return "oversize"
    if "behind list" in e or e == "lateevent":
        return "late"
    if "ahead of the stream" in e:
        return "future"
    if "timestamp" in e and ("outside" in e or "1970" in e):
        return "timestamp"
    if e.startswith(("expected", "object missing", "object contains", "invalid")) or "- at `$" in e:
        return "schema"
    return "other"


# -- the busiest lists ---------------------------------------------------------------------------
class _Rates:
    __slots__ = ("t", "replies", "deliveries", "members")

    def __init__(self, t: float):
        self.t = t
        self.replies = 0.0
        self.deliveries = 0.0
        self.members = 0


class TopLists:
    """Per-list reply and delivery rates, for the busiest lists only.

    Each tracked list keeps two counts decaying exponentially with event time
    (time constant ``tau`` seconds, one minute by default), so a count reads as
    "per minute" and fades once the list goes quiet. At most ``capacity``
    lists are tracked: past that, the quietest half is forgotten, so memory
    stays bounded however many lists the stream holds.

    >>> top = TopLists(n=2)
    >>> for i in range(30):
    ...     top.observe("all@nhs.net", 1000.0 + i, 840_000, is_reply=True)
    >>> top.observe("team@nhs.net", 1029.0, 12, is_reply=False)
    >>> top.observe("quiet@nhs.net", 1029.0, 3, is_reply=False)
    >>> [address for address, _ in top.top()]
    ['all@nhs.net', 'team@nhs.net']
    >>> round(dict(top.top())["all@nhs.net"]["replies_per_minute"])  # 30 in the last 30 s, the oldest fading
    24
    """

    def __init__(self, n: int = TOP_LISTS, capacity: int = TOP_LISTS_CAPACITY, tau: float = RATE_TAU):
        self.n = n
        self.capacity = max(capacity, 2 * n, 2)
        self.tau = tau
        self.now = -math.inf
        self._rates: dict[str, _Rates] = {}

    def __len__(self) -> int:
        return len(self._rates)

    def observe(self, address: str, t: float, members: int, is_reply: bool) -> None:
        """One post to ``address`` at event time ``t`` that reached ``members`` mailboxes."""
        r = self._rates.get(address)
        if r is None:
            r = self._rates[address] = _Rates(t)
            if len(self._rates) > self.capacity:
                self._prune()
        weight = 1.0
        if t > r.t:
            decay = math.exp(-(t - r.t) / self.tau)
            r.replies *= decay
            r.deliveries *= decay
            r.t = t
        else:  # a little late: counts as it would have, decayed to the list's own clock
            weight = math.exp(-(r.t - t) / self.tau)
        r.deliveries += members * weight
        if is_reply:
            r.replies += weight
        r.members = members
        if t > self.now:
            self.now = t

    def _decayed(self, r: _Rates, now: float) -> tuple[float, float]:
        decay = math.exp(-(now - r.t) / self.tau) if now > r.t else 1.0
        return r.replies * decay, r.deliveries * decay

    def _prune(self) -> None:
        now = self.now
        ranked = sorted(self._rates.items(), key=lambda kv: self._decayed(kv[1], now)[1], reverse=True)
        self._rates = dict(ranked[: self.capacity // 2])

    def rates(self, address: str) -> Optional[dict]:
        r = self._rates.get(address)
        if r is None:
            return None
        replies, deliveries = self._decayed(r, self.now)
        return {"replies_per_minute": replies * 60.0 / self.tau,
                "deliveries_per_minute": deliveries * 60.0 / self.tau, "members": r.members}

    def top(self) -> list[tuple[str, dict]]:
        """The ``n`` busiest lists by deliveries per minute, busiest first."""
        if self.n <= 0:
            return []
        now = self.now
        items = list(self._rates.items())
        items.sort(key=lambda kv: self._decayed(kv[1], now)[::-1], reverse=True)
        return [(address, self.rates(address)) for address, _ in items[: self.n]]


TOP = TopLists()
_detectors: "weakref.WeakSet" = weakref.WeakSet()
_last_detector: Callable[[], Any] = lambda: None  # a weak reference to the detector observe_event saw last
#: (topic, partition) -> messages behind the log end, refreshed by observe_consumer.
_consumer_lag: dict[tuple[str, int], int] = {}


class _PerListCollector(Collector):
    """``stormguard_list_*{list}`` for the busiest and the frozen lists, computed per scrape."""

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        velocity = GaugeMetricFamily("stormguard_list_reply_velocity",
                                     "Reply-alls to the list per minute (event time, decayed over 1 min)",
                                     labels=["list"])
        deliveries = GaugeMetricFamily("stormguard_list_deliveries_per_minute",
                                       "Mailbox deliveries per minute caused by posts to the list (event time)",
                                       labels=["list"])
        window = GaugeMetricFamily("stormguard_list_replies_in_window",
                                   "Reply-alls in the detector's velocity window (what the policy counts)",
                                   labels=["list"])
        norm = GaugeMetricFamily("stormguard_list_reply_norm",
                                 "Reply-alls per window the list's learned norm makes unremarkable",
                                 labels=["list"])
        members = GaugeMetricFamily("stormguard_list_members", "Members at the list's last expansion",
                                    labels=["list"])
        frozen = GaugeMetricFamily("stormguard_list_frozen", "1 while the list is frozen", labels=["list"])
        try:
            rows = per_list_snapshot()
        except Exception:  # a scrape must never fail because of one list
            log.exception("per-list metrics failed")
            rows = []
        for address, row in rows:
            velocity.add_metric([address], row["replies_per_minute"])
            deliveries.add_metric([address], row["deliveries_per_minute"])
            window.add_metric([address], row["replies_in_window"])
            norm.add_metric([address], row["reply_norm"])
            members.add_metric([address], row["members"])
            frozen.add_metric([address], 1.0 if row["frozen"] else 0.0)
        yield from (velocity, deliveries, window, norm, members, frozen)


class _ConsumerCollector(Collector):
    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lag = GaugeMetricFamily("stormguard_consumer_lag",
                                "Records in the partition not yet read by this worker (log end - position)",
                                labels=["topic", "partition"])
        assigned = GaugeMetricFamily("stormguard_assigned_partitions",
                                     "Partitions of the events topic assigned to this worker")
        snapshot = dict(_consumer_lag)
        for (topic, partition), value in sorted(snapshot.items()):
            lag.add_metric([topic, str(partition)], value)
        assigned.add_metric([], len(snapshot))
        yield lag
        yield assigned


REGISTRY.register(_PerListCollector())
REGISTRY.register(_ConsumerCollector())


def per_list_snapshot() -> list[tuple[str, dict]]:
    """Rows of the per-list series: the busiest lists, then frozen ones, bounded in number."""
    rows: dict[str, dict] = {}
    detectors = list(_detectors)
    for address, rates in TOP.top():
        rows[address] = dict(rates)
    frozen_extra = 0
    for det in detectors:
        for status in det.frozen_lists():
            if status.list in rows:
                continue
            if frozen_extra >= MAX_FROZEN_LISTS:
                break
            rows[status.list] = TOP.rates(status.list) or {"replies_per_minute": 0.0,
                                                            "deliveries_per_minute": 0.0, "members": 0}
            frozen_extra += 1
    for address, row in rows.items():
        row.update(frozen=False, replies_in_window=0, reply_norm=0.0)
        for det in detectors:
            state = det.lists.get(address)
            if state is None:
                continue
            t = det.watermark if det.watermark is not None else state.last_seen
            row["replies_in_window"] = state.velocity.count(t)
            row["reply_norm"] = state.velocity.expected_upper(det.config.norm_sigmas)
            row["frozen"] = state.frozen
            row["members"] = row["members"] or state.members
            break
    return list(rows.items())


# -- the hooks ------------------------------------------------------------------------------------
def observe_action(action, produced_at: Optional[float] = None, now: Optional[float] = None) -> None:
    """Count one published action; ``produced_at`` (epoch s) times produce → action."""
    ACTIONS.labels(kind=action.kind, detector=action.detector).inc()
    if action.kind == "alert" and FREEZE_CAP_MARK in action.reason:
        FREEZES_CAPPED.inc()
    if produced_at is not None:
        now = time.time() if now is None else now
        SCORING_LATENCY.observe(max(0.0, now - produced_at))


def observe_event(detector, outcome, produced_at: Optional[float]) -> None:
    """After each record: count it, time it, note its actions and its lists' rates.

    ``outcome`` is a :class:`detectors.engine.Outcome`; ``produced_at`` is the
    Kafka record timestamp in epoch seconds (``None`` when the record has none).
    """
    global _last_detector
    now = time.time()
    if detector is not None and _last_detector() is not detector:  # a WeakSet lookup makes a weakref each time
        _detectors.add(detector)
        _last_detector = weakref.ref(detector)
    if produced_at is not None:
        RECORD_LATENCY.observe(max(0.0, now - produced_at))
    if outcome.error is not None:
        EVENTS_INVALID.labels(reason=reason_category(outcome.error)).inc()
    else:
        EVENTS_PROCESSED.inc()
        event = outcome.event
        if event is not None:
            t = event.event_time
            EVENT_TIME_LAG.observe(max(0.0, now - t))
            DELIVERIES.inc(event.deliveries)
            if event.lists:
                reply = event.is_reply
                if reply:
                    REPLIES.inc()
                for address, members in event.lists.items():
                    TOP.observe(address, t, members, reply)
    changed = False
    for action in outcome.actions:
        observe_action(action, produced_at, now)
        changed = changed or action.kind != "alert"
    if changed and detector is not None:
        _refresh_detector_gauges()


def observe_events(detector, produced: list, scored: list, acted: list, errors: list) -> None:
    """:func:`observe_event` for a batch, told what the worker's scoring loop gathered anyway:

    ``produced``, the Kafka timestamp (epoch seconds) of each record that has one; ``scored``, each record's
    :class:`~detectors.events.MailEvent` that was scored or routed, in order; ``acted``, ``(actions, produced
    at)`` of each record that had actions; ``errors``, the reason of each record dead-lettered.

    The same series move by the same amounts, but the clock is read once and each counter is
    bumped once per batch (the worker scores hundreds of records a batch, and per-record calls
    were a tenth of its time); a record's latency is to the end of its batch, when it is acked.
    Each series is one pass over the batch, in a comprehension: one loop doing it all, a ``max``
    and a property call per record, cost 2.4 µs a record (a tenth of the worker's time again). Lists
    rather than an ``Outcome`` per record: most records have no actions, and the loop that scores them
    makes no object for them (worker/app.py).
    """
    global _last_detector
    now = time.time()
    if detector is not None and _last_detector() is not detector:
        _detectors.add(detector)
        _last_detector = weakref.ref(detector)
    if produced:
        RECORD_LATENCY.observe_many([now - produced_at for produced_at in produced])
    for error in errors:
        EVENTS_INVALID.labels(reason=reason_category(error)).inc()
    if scored:
        EVENTS_PROCESSED.inc(len(scored))
        times = [event.event_time for event in scored]
        EVENT_TIME_LAG.observe_many([now - t for t in times])
        DELIVERIES.inc(sum([event.deliveries for event in scored]))
        replies = 0
        top = TOP.observe
        for event, t in zip(scored, times):
            if event.lists:
                reply = event.is_reply
                replies += reply
                for address, members in event.lists.items():
                    top(address, t, members, reply)
        REPLIES.inc(replies)
    changed = False
    for actions, produced_at in acted:
        for action in actions:
            observe_action(action, produced_at, now)
            changed = changed or action.kind != "alert"
    if changed and detector is not None:
        _refresh_detector_gauges()


def _refresh_detector_gauges() -> None:
    detectors = list(_detectors)
    if not detectors:
        return
    FROZEN_LISTS.set(sum(len(d.frozen_lists()) for d in detectors))
    TRACKED_SENDERS.set(sum(len(d.senders) for d in detectors))
    TRACKED_LISTS.set(sum(len(d.lists) for d in detectors))
    marks = [d.watermark for d in detectors if d.watermark is not None]
    if marks:
        WATERMARK.set(max(marks))


def observe_consumer(app, topics: Iterable[str] = (EVENTS_TOPIC,)) -> None:
    """Every second: consumer lag per assigned partition of ``topics``, and the detector gauges.

    Lag is the partition's log end offset (the consumer's highwater) minus the
    next offset this worker will read (the last offset handed to a stream + 1,
    else the committed offset). Partitions whose position is not known yet are
    left out rather than guessed.
    """
    _refresh_detector_gauges()
    wanted = set(topics)
    lags: dict[tuple[str, int], int] = {}
    try:
        consumer = app.consumer
        assignment = consumer.assignment()
    except Exception:  # not started, or between rebalances
        _consumer_lag.clear()
        return
    monitor = getattr(app, "monitor", None)
    read = getattr(monitor, "tp_read_offsets", None) or {}
    committed = getattr(monitor, "tp_committed_offsets", None) or {}
    ends = getattr(monitor, "tp_end_offsets", None) or {}
    seeded = getattr(consumer, "_committed_offset", None) or {}
    for tp in assignment:
        if tp.topic not in wanted:
            continue
        try:
            end = consumer.highwater(tp)
        except Exception:
            end = None
        if end is None:
            end = ends.get(tp)
        if end is None:
            continue
        if read.get(tp) is not None:
            position = read[tp] + 1
        else:
            position = committed.get(tp)
            if position is None:
                position = seeded.get(tp)
        if position is None:
            if end:
                continue  # nothing read, nothing committed: the position is not known yet
            position = 0
        lags[(tp.topic, tp.partition)] = max(0, int(end) - int(position))
    _consumer_lag.clear()
    _consumer_lag.update(lags)


def reset_for_tests() -> None:
    """Forget per-list rates, detectors and lag (the counters are left as they are)."""
    global TOP, _last_detector
    TOP = TopLists()
    _detectors.clear()
    _last_detector = lambda: None
    _consumer_lag.clear()
