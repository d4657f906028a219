"""The worker's metrics hooks, fed by the real detector (no Kafka needed here; the live test covers that)."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from detectors.engine import StormDetector, process_raw
from detectors.events import parse_event, InvalidEvent
from detectors.policy import PolicyConfig
from stream_jobs import metrics
from stream_jobs.observability.localstack import STORM_LIST, storm_events


@pytest.fixture(autouse=True)
def _fresh_lists():
    metrics.reset_for_tests()
    yield
    metrics.reset_for_tests()


def _value(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def _samples(name: str) -> list:
    text = generate_latest(metrics.REGISTRY).decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def _feed(detector, records, produced_at=None):
    for raw in records:
        metrics.observe_event(detector, process_raw(detector, raw), produced_at)


def test_a_storm_is_counted_frozen_and_timed():
    det = StormDetector(PolicyConfig())
    records = storm_events(end=time.time())
    before = {k: _value(k) for k in ("stormguard_events_processed_total", "stormguard_list_replies_total",
                                     "stormguard_produce_to_action_seconds_count",
                                     "stormguard_record_latency_seconds_count")}
    freezes = _value("stormguard_actions_total", kind="freeze", detector="reply_to_anomalous_post")
    _feed(det, records, produced_at=time.time() - 0.05)
    assert _value("stormguard_events_processed_total") - before["stormguard_events_processed_total"] == len(records)
    assert _value("stormguard_record_latency_seconds_count") - before["stormguard_record_latency_seconds_count"] \
        == len(records)
    assert _value("stormguard_list_replies_total") - before["stormguard_list_replies_total"] >= 300
    assert _value("stormguard_actions_total", kind="freeze", detector="reply_to_anomalous_post") - freezes == 1
    assert _value("stormguard_produce_to_action_seconds_count") - before[
        "stormguard_produce_to_action_seconds_count"] >= 2  # the alert and the freeze
    assert _value("stormguard_frozen_lists") == 1
    assert _value("stormguard_list_frozen", list=STORM_LIST) == 1
    assert _value("stormguard_list_members", list=STORM_LIST) == 840_000
    # the busiest list is the storm list, by a mile
    deliveries = {s.labels["list"]: s.value for s in _samples("stormguard_list_deliveries_per_minute")}
    assert max(deliveries, key=deliveries.get) == STORM_LIST
    assert deliveries[STORM_LIST] > 840_000  # more than one reply-all a minute to 840k mailboxes
    assert _value("stormguard_list_replies_in_window", list=STORM_LIST) > _value("stormguard_list_reply_norm",
                                                                                 list=STORM_LIST)


def test_invalid_records_fold_into_few_reasons():
    bad = [b"not json at all", b'{"message_id": "m", "timestamp": 5}',
           b'{"message_id": "m", "timestamp": -5, "sender": "a", "recipients": ["b"]}',
           b'{"message_id": "m", "timestamp": 1479110000, "sender": "a", "recipients": []}',
           b'\xff\xfe\x00garbage', b"x" * 300_000,
           b'{"message_id": "m", "timestamp": 99999999999, "sender": "a", "recipients": ["b"]}']
    reasons = []
    for raw in bad:
        with pytest.raises(InvalidEvent) as exc:
            parse_event(raw)
        reasons.append(metrics.reason_category(str(exc.value)))
    assert reasons[0] == "not_json" and reasons[1] == "schema" and reasons[5] == "oversize"
    assert "other" not in reasons, reasons
    assert set(reasons) <= set(metrics.INVALID_REASONS)
    det = StormDetector()
    _feed(det, bad)
    labels = {s.labels["reason"] for s in _samples("stormguard_events_invalid_total")}
    assert labels == set(metrics.INVALID_REASONS)  # fixed set: no free text ever becomes a label


def test_late_and_future_events_have_their_own_reason():
    det = StormDetector()
    ev = {"sender": "a@x", "recipients": ["l@x"], "lists": {"l@x": 10}}
    _feed(det, [json.dumps({"message_id": "1", "timestamp": 10_000, **ev}).encode()])
    late = process_raw(det, json.dumps({"message_id": "2", "timestamp": 1_000, **ev}).encode())
    future = process_raw(det, json.dumps({"message_id": "3", "timestamp": 10_000 + 30 * 86400, **ev}).encode())
    assert metrics.reason_category(late.error) == "late"
    assert metrics.reason_category(future.error) == "future"


def test_per_list_series_stay_bounded_however_many_senders_and_lists():
    det = StormDetector(PolicyConfig(warmup_events=10**9))  # learn only: no freezes here
    t0 = 1_479_110_000.0
    records = []
    for i in range(20_000):
        lst = f"list{i % 3000}@nhs.example"
        records.append(json.dumps({"message_id": f"m{i}", "timestamp": t0 + i * 0.5, "sender": f"s{i}@nhs.example",
                                   "recipients": [lst], "lists": {lst: 100 + i % 3000}}).encode())
    _feed(det, records)
    for name in ("stormguard_list_reply_velocity", "stormguard_list_deliveries_per_minute",
                 "stormguard_list_frozen", "stormguard_list_members"):
        assert 0 < len(_samples(name)) <= metrics.TOP_LISTS + metrics.MAX_FROZEN_LISTS, name
    assert len(metrics.TOP) <= metrics.TOP.capacity
    text = generate_latest(metrics.REGISTRY).decode()
    assert "s19999@nhs.example" not in text  # no sender ever becomes a label
    assert len(text) < 60_000


def test_top_lists_rank_by_deliveries_and_fade_in_event_time():
    top = metrics.TopLists(n=2, capacity=8)
    top.observe("big@x", 0.0, 800_000, is_reply=False)
    for i in range(10):
        top.observe("chatty@x", float(i), 50, is_reply=True)
    top.observe("small@x", 10.0, 10, is_reply=False)
    assert [a for a, _ in top.top()] == ["big@x", "chatty@x"]
    before = top.rates("big@x")["deliveries_per_minute"]
    top.observe("small@x", 1200.0, 10, is_reply=False)  # twenty quiet minutes later
    assert top.rates("big@x")["deliveries_per_minute"] < before * 1e-8
    assert [a for a, _ in top.top()][0] == "small@x"
    for i in range(100):  # many lists: memory stays bounded, the busiest survive the pruning
        top.observe(f"l{i}@x", 1200.0, i, is_reply=False)
    assert len(top) <= 8
    assert top.top()[0][0] == "l99@x"


def test_outbox_and_delivery_metrics_exist_for_issue_4():
    assert _samples("stormguard_outbox_backlog")
    sinks = {s.labels["sink"] for s in _samples("stormguard_delivery_failures_total")}
    assert set(metrics.SINKS) <= sinks
    before = _value("stormguard_delivery_failures_total", sink="mailman")
    metrics.DELIVERY_FAILURES.labels(sink="mailman").inc()
    assert _value("stormguard_delivery_failures_total", sink="mailman") == before + 1


def test_a_batch_moves_every_series_as_its_records_one_by_one():
    """``observe_events`` (the worker, once per batch) and ``observe_event`` (once per record) agree:
    the same counts, deliveries, replies, actions, invalid records and per-list rates."""
    records = storm_events(end=time.time()) + [b"not json", b'{"message_id": "x"}']
    names = ("stormguard_events_processed_total", "stormguard_deliveries_total", "stormguard_list_replies_total",
             "stormguard_event_time_lag_seconds_count", "stormguard_record_latency_seconds_count",
             "stormguard_produce_to_action_seconds_count")

    def run(batched: bool) -> dict:
        metrics.reset_for_tests()
        before = {k: _value(k) for k in names}
        invalid = sum(s.value for s in _samples("stormguard_events_invalid_total"))
        det = StormDetector(PolicyConfig())
        produced_at = time.time() - 0.05
        outcomes = [process_raw(det, raw) for raw in records]
        if batched:
            for i in range(0, len(outcomes), 500):
                batch = outcomes[i:i + 500]  # as the worker's scoring loop gathers them
                metrics.observe_events(det, [produced_at] * len(batch),
                                       [o.event for o in batch if o.error is None],
                                       [(o.actions, produced_at) for o in batch if o.actions],
                                       [o.error for o in batch if o.error is not None])
        else:
            for o in outcomes:
                metrics.observe_event(det, o, produced_at)
        moved = {k: _value(k) - before[k] for k in names}
        moved["invalid"] = sum(s.value for s in _samples("stormguard_events_invalid_total")) - invalid
        moved["frozen"] = _value("stormguard_frozen_lists")
        moved["rates"] = {s.labels["list"]: round(s.value, 6) for s in _samples("stormguard_list_deliveries_per_minute")}
        return moved

    one_by_one, batched = run(False), run(True)
    assert one_by_one == batched
    assert batched["stormguard_events_processed_total"] == len(records) - 2 and batched["invalid"] == 2
    assert batched["frozen"] == 1 and batched["rates"]


def test_a_histogram_fed_a_batch_counts_as_one_fed_each_value():
    """``observe_many`` (the worker's, once per batch) puts each value in the bucket ``observe`` would,
    bounds included, whatever the order."""
    import random

    rng = random.Random(19)
    bounds = (0.001, 0.01, 0.1, 1.0, 10.0)
    values = [rng.choice(bounds) for _ in range(200)] + [rng.uniform(0, 20) for _ in range(800)] + [0.0, 99.0]
    one = metrics.RecordHistogram("one_by_one", "test", bounds)
    many = metrics.RecordHistogram("batched", "test", bounds)
    for v in values:
        one.observe(v)
    rng.shuffle(values)
    for i in range(0, len(values), 300):
        many.observe_many(values[i:i + 300])
    many.observe_many([])
    assert many.counts == one.counts and sum(many.counts) == len(values)
    assert many.sum == pytest.approx(one.sum)
