"""Thousands of generated records, valid and not, through the live worker.

Every valid one must be scored and every invalid one dead-lettered with a
reason: the DLQ must hold exactly the records the offline parser rejects.
"""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.engine import StormDetector, process_raw
from tests.conftest import produce_lines, read_topic

pytestmark = pytest.mark.live

T0 = 1_479_110_000.0
addresses = st.one_of(st.sampled_from([f"u{i}@nhs.net" for i in range(50)] + ["all@nhs.net", "team@example.org"]),
                      st.text(min_size=1, max_size=12))

valid_event = st.fixed_dictionaries(
    {"message_id": st.text(min_size=1, max_size=20), "timestamp": st.floats(T0, T0 + 86_400),
     "sender": addresses, "recipients": st.lists(addresses, min_size=1, max_size=5)},
    optional={"lists": st.dictionaries(addresses, st.integers(0, 900_000), max_size=2),
              "in_reply_to": st.one_of(st.none(), st.text(max_size=10)),
              "subject": st.text(max_size=30), "delivered_count": st.integers(0, 10**6)})

bad_value = st.one_of(st.none(), st.integers(-10**20, 10**20), st.floats(allow_nan=False), st.text(max_size=5),
                      st.lists(st.integers(), max_size=2), st.just([]), st.just({}))


@st.composite
def record(draw) -> bytes:
    event = draw(valid_event)
    how = draw(st.sampled_from(["valid", "valid", "drop", "retype", "garbage", "nan", "future", "oversize"]))
    if how == "drop":
        del event[draw(st.sampled_from(["message_id", "timestamp", "sender", "recipients"]))]
    elif how == "retype":
        event[draw(st.sampled_from(sorted(event)))] = draw(bad_value)
    elif how == "garbage":
        return draw(st.binary(min_size=1, max_size=40))
    elif how == "nan":
        return json.dumps({**event, "timestamp": math.nan}).encode()
    elif how == "future":
        event["timestamp"] = T0 + 10**9
    elif how == "oversize":
        event["subject"] = "x" * 300_000
    return json.dumps(event).encode()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from stream_jobs.kafka.broker import EmbeddedBroker, free_port
    from tests.conftest import WorkerProcess

    with EmbeddedBroker(port=free_port()) as broker:
        worker = WorkerProcess(broker.url, tmp_path_factory.mktemp("fuzz")).start()
        try:
            yield broker, worker, StormDetector(), {"sent": 0, "dead": []}
        finally:
            worker.stop()


def _counter(worker, name):
    with urllib.request.urlopen(worker.url + "/metrics", timeout=5) as resp:
        return sum(float(line.rsplit(" ", 1)[1]) for line in resp.read().decode().splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))


@settings(max_examples=15, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(batch=st.lists(record(), min_size=40, max_size=120))
def test_every_record_is_scored_or_dead_lettered(live, batch):
    broker, worker, offline, seen = live
    expected_dead = []
    for raw in batch:
        outcome = process_raw(offline, raw)  # the same decision path, fed the same order
        if outcome.error is not None:
            expected_dead.append(raw)
    produce_lines(broker.bootstrap, batch)
    seen["sent"] += len(batch)
    seen["dead"] += expected_dead

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = _counter(worker, "stormguard_events_processed_total") + \
            _counter(worker, "stormguard_events_invalid_total")
        if done >= seen["sent"]:
            break
        time.sleep(0.2)
    assert done == seen["sent"], "a record was neither scored nor dead-lettered"
    assert _counter(worker, "stormguard_events_invalid_total") == len(seen["dead"])
    dlq = read_topic(broker.bootstrap, "mail.events.dlq", until=lambda r: len(r) >= len(seen["dead"]))
    envelopes = [json.loads(r.value) for r in dlq]
    assert sorted(base64.b64decode(e["raw_base64"]) for e in envelopes) == sorted(seen["dead"])
    assert all(e["reason"] for e in envelopes)
    assert worker.proc.poll() is None
