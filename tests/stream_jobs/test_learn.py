"""``stormguard learn`` without a broker: what it learns, and the records it would write."""

from __future__ import annotations

import argparse
import doctest
import json
import math
import pickle

import stream_jobs.learn as learn
from detectors.engine import StormDetector
from detectors.policy import PolicyConfig
from tests.conftest import ROOT
from tests.scenarios import background, bulletin_storm, lines


def test_doctests():
    assert doctest.testmod(learn).failed == 0


def test_history_is_learned_without_a_single_action_and_written_where_each_list_lives():
    det = StormDetector(PolicyConfig(learn_only_until=math.inf))
    storm = bulletin_storm(replies=8) + [{"message_id": "x", "timestamp": 1_479_110_000.0 + 1000,
                                          "sender": "a@nhs.net", "recipients": ["team@nhs.net"],
                                          "lists": {"team@nhs.net": 40}}]
    result = learn.learn_events(det, lines(background(200) + storm))
    assert result.learned == 200 + len(storm) and result.rejected == 0
    assert not det.frozen_lists() and det.history_learned == result.learned  # a storm in history is no freeze
    records = list(learn.changelog_records(det, 6))
    models = {json.loads(k): (p, v) for p, k, v in records if json.loads(k) != learn.META_KEY}
    assert set(models) == {"bulletin@nhs.net", "team@nhs.net"}
    for address, (partition, value) in models.items():
        assert partition == learn.home_partition(address, 6)
        assert pickle.loads(value).posts == det.lists[address].posts
    metas = [(p, json.loads(v)) for p, k, v in records if json.loads(k) == learn.META_KEY]
    assert sorted(p for p, _ in metas) == list(range(6))  # every worker gets the stream's counters
    assert all(m == {"events_seen": det.events_seen, "watermark": None, "largest_list": 50_000} for _, m in metas)


def test_a_detector_that_would_act_is_refused():
    try:
        learn.learn_events(StormDetector(), [])
    except ValueError as exc:
        assert "learn_only_until=inf" in str(exc)
    else:
        raise AssertionError("a detector that acts on events must not be used to learn")


def test_a_postfix_maillog_becomes_events_through_the_ingest_parser():
    here = ROOT / "tests" / "stream_jobs"
    args = argparse.Namespace(lists=[str(here / "postfix_virtual_lists.txt")], list_counts=["ops@lists.example.test=7"],
                              min_members=2, timezone="UTC")
    with open(here / "postfix_maillog_delivered.log", "rb") as fh:
        assert learn.sniff_format(fh.peek(4096)) == "postfix-log"
        events = [json.loads(raw) for raw in learn.archive_records(fh, "postfix-log", args)]
    assert events and all(e["message_id"] and e["timestamp"] > 0 for e in events)
    assert any("all@lists.example.test" in e.get("lists", {}) for e in events)
