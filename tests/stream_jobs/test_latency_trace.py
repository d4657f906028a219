"""``STORMGUARD_LATENCY_TRACE``: the worker's side of the bench's produce->freeze breakdown."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import namedtuple

from detectors.engine import Outcome
from detectors.policy import Action
from stream_jobs.settings import WorkerSettings
from stream_jobs.worker.event_order import EventTimeScheduler
from stream_jobs.worker.latency_trace import LatencyTrace

TP = namedtuple("TP", "topic partition")
Rec = namedtuple("Rec", "offset value")
Msg = namedtuple("Msg", "topic partition offset timestamp")


class Ev:
    def __init__(self, msg):
        self.message = msg


def test_the_trace_notes_when_each_ordered_record_came_and_went_through_the_scheduler():
    trace, sched = LatencyTrace(), EventTimeScheduler(ordered_topics={"mail.events"})
    fetch = {TP("mail.events", 0): [Rec(0, b'{"timestamp": 9}')], TP("mail.events", 1): [Rec(4, b'{"timestamp": 5}')],
             TP("other", 0): [Rec(7, b"x")]}
    out = list(trace.iterate(sched.iterate, fetch, sched.ordered_topics))
    # the scheduler's order is kept: the other topic first, then oldest event first
    assert [(tp.topic, tp.partition, r.offset) for tp, r in out] == [("other", 0, 7), ("mail.events", 1, 4),
                                                                     ("mail.events", 0, 0)]
    assert set(trace.fetched) == {("mail.events", 0, 0), ("mail.events", 1, 4)}
    for key in trace.fetched:
        assert trace.fetched[key] <= trace.released[key]


def test_a_freeze_is_logged_when_the_broker_has_it_and_the_trace_forgets_old_records(caplog):
    trace = LatencyTrace(keep=10)
    sched = EventTimeScheduler(ordered_topics={"mail.events"})
    fetch = {TP("mail.events", 0): [Rec(i, b'{"timestamp": %d}' % i) for i in range(30)]}
    list(trace.iterate(sched.iterate, fetch, sched.ordered_topics))
    assert len(trace.fetched) <= 10 and ("mail.events", 0, 29) in trace.fetched  # the newest are kept

    event = Ev(Msg("mail.events", 0, 29, 1479112200.0))
    common = dict(list="l@x", sender=None, event_time=1479112200.0, detector="velocity", score=9.0, message_id="<m>")
    freeze = Action(kind="freeze", reason="storm", **common)
    alert = Action(kind="alert", reason="fan-out", **common)
    loop = asyncio.new_event_loop()
    try:
        delivered = loop.create_future()
        with caplog.at_level(logging.WARNING, logger="stormguard.latency"):
            trace.freeze(event, Outcome([alert, freeze], None, None), 3, 5, 1.0, 2.0, delivered)
            assert not caplog.records  # written once the broker has the freeze
            delivered.set_result(None)
            loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("latency-trace ")
    t = json.loads(line.split(" ", 1)[1])
    assert (t["partition"], t["offset"], t["index"], t["batch_len"]) == (0, 29, 3, 5)
    assert t["fetched"] <= t["released"] and t["scored"] == 2.0 and t["released"] <= t["published"] <= t["acked"]


def test_the_trace_is_off_unless_asked():
    assert WorkerSettings.from_env({}).latency_trace is False
    assert WorkerSettings.from_env({"STORMGUARD_LATENCY_TRACE": "true"}).latency_trace is True
