"""Prometheus metrics of the worker, served on ``GET /metrics``.

Label cardinality is bounded on purpose: per-list series exist only for the
``TOP_LISTS`` busiest lists (see :class:`TopLists`), never one per sender.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_PROCESSED = Counter("stormguard_events_processed", "Events scored by the detectors",
                           registry=REGISTRY)
EVENTS_INVALID = Counter("stormguard_events_invalid", "Records dead-lettered to mail.events.dlq",
                         ["reason"], registry=REGISTRY)
ACTIONS = Counter("stormguard_actions", "Actions published to stormguard.actions", ["kind", "detector"],
                  registry=REGISTRY)
FROZEN_LISTS = Gauge("stormguard_frozen_lists", "Lists frozen right now", registry=REGISTRY)
TRACKED_SENDERS = Gauge("stormguard_tracked_senders", "Senders with a learned baseline", registry=REGISTRY)
TRACKED_LISTS = Gauge("stormguard_tracked_lists", "Lists with a learned baseline", registry=REGISTRY)
EVENT_TIME_LAG = Histogram(
    "stormguard_event_time_lag_seconds", "Worker clock minus the event's own timestamp when scored",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, float("inf")), registry=REGISTRY)
SCORING_LATENCY = Histogram(
    "stormguard_produce_to_action_seconds", "Kafka record timestamp (produce) to action published",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")), registry=REGISTRY)
PROCESSING_SECONDS = Histogram(
    "stormguard_processing_seconds", "Time the detectors spend on one event",
    buckets=(0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.1, float("inf")),
    registry=REGISTRY)
