"""Faults the worker must survive: each against the real embedded broker and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import ROOT, STORMGUARD, produce_lines, read_topic, wait_for
from tests.scenarios import T0, background, bulletin_storm, lines

pytestmark = [pytest.mark.live, pytest.mark.both_brokers]


def metric(worker, name: str) -> float:
    with urllib.request.urlopen(worker.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def committed_offsets(bootstrap: str, group: str, topic: str = "mail.events") -> dict[int, int]:
    """The group's committed offset of each partition of ``topic`` (0 where none)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) or 0
                for p in sorted(consumer.partitions_for_topic(topic) or ())}
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str = "mail.events") -> dict[int, int]:
    """One past the last record of each partition of ``topic`` (Tansu reports the start of the last batch)."""
    from kafka import KafkaConsumer, TopicPartition

    from stream_jobs.worker.faust_tuning import true_end_offsets

    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        reported = consumer.end_offsets(tps)
    finally:
        consumer.close()
    return {tp.partition: n for tp, n in true_end_offsets([bootstrap], {}, reported).items()}


def split_bulletin_storm(background_events: int = 200) -> tuple[list[dict], list[dict]]:
    """Background, the bulletin history and two reply-alls; then the rest of the reply-alls."""
    events = background(background_events) + bulletin_storm()
    return events[:-4], events[-4:]


def two_workers_score(broker, start_worker, before: list[dict], env: dict):
    """Two workers of one group score ``before`` between them; returns them as (list owner, the other).

    Warm-up counts the events each worker has scored: with two workers sharing the background,
    each must see STORMGUARD_WARMUP_EVENTS (100) of its own. The wait is generous: on a loaded
    machine a worker late with its heartbeats is put out of the group and rejoins (seen on Apache
    Kafka, whose coordinator holds the session timeout strictly).
    """
    w1 = start_worker(broker.url, env=env)
    w2 = start_worker(broker.url, app_id=w1.app_id, env=env)
    produce_lines(broker.bootstrap, lines(before))
    wait_for(lambda: metric(w1, "stormguard_events_processed_total")
             + metric(w2, "stormguard_events_processed_total") >= len(before), timeout=150.0,
             what="both workers to score the background")
    # the detector gauges are refreshed every second
    owner = wait_for(lambda: next((w for w in (w1, w2) if metric(w, "stormguard_tracked_lists") >= 1), None),
                     timeout=10, what="the worker that holds the list")
    return owner, (w2 if owner is w1 else w1)


def offline_actions(events, tmp_path) -> list[dict]:
    path = tmp_path / "offline.jsonl"
    path.write_bytes(b"\n".join(lines(events)) + b"\n")
    run = subprocess.run(STORMGUARD + ["score", str(path)], cwd=ROOT, capture_output=True, check=True)
    return [json.loads(line) for line in run.stdout.splitlines()]


def live_actions(broker) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(broker.bootstrap, "stormguard.actions")]


def test_kill_9_mid_storm_then_restart_loses_nothing_and_duplicates_nothing(broker, start_worker, tmp_path):
    before, after = split_bulletin_storm()
    expected = offline_actions(before + after, tmp_path)
    assert [a["kind"] for a in expected].count("freeze") == 1

    worker = start_worker(broker.url)
    produce_lines(broker.bootstrap, lines(before))
    wait_for(lambda: metric(worker, "stormguard_events_processed_total") >= len(before))
    worker.kill()  # at once: the last offsets are probably not committed, so events are re-read

    again = start_worker(broker.url, app_id=worker.app_id)
    assert again.ready_after is not None
    produce_lines(broker.bootstrap, lines(after))
    wait_for(lambda: again.get("/api/lists/bulletin@nhs.net")["frozen"])
    time.sleep(1.0)
    got = live_actions(broker)
    # At-least-once: an action whose event was re-read may be published again,
    # but only ever as the same decision under the same idempotency key, which
    # `stormguard deliver` passes on as webhook-id.
    by_id: dict[str, dict] = {}
    for action in got:
        assert by_id.setdefault(action["action_id"], action) == action
    assert sorted(by_id) == sorted(a["action_id"] for a in expected)
    assert [a["message_id"] for a in got if a["kind"] == "freeze"] == ["bre2"]


def test_broker_outage_while_worker_runs(broker, start_worker):
    """The broker stops answering for longer than the session timeout, then comes back.

    SIGSTOP/SIGCONT keeps even Tansu's (memory-only) data; a real kill -9 and restart
    of Apache Kafka on its data is in test_kafka_faults_live.py. The worker must
    reconnect, rejoin its group and resume alone.
    """
    worker = start_worker(broker.url)
    produce_lines(broker.bootstrap, lines(background(150)))
    wait_for(lambda: metric(worker, "stormguard_events_processed_total") >= 150)
    # and committed (every 2.8 s): events scored but not committed are read again after the rejoin
    # (at-least-once), which the exact count below would take for a fault
    wait_for(lambda: sum(committed_offsets(broker.bootstrap, worker.app_id).values()) >= 150, timeout=30,
             what="the worker to commit its offsets")
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(12.0)  # two session timeouts
        assert worker.proc.poll() is None
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    storm = [{"message_id": "root2", "timestamp": T0 + 9000, "sender": "tester@supplier.example",
              "recipients": ["everyone@nhs.net"], "lists": {"everyone@nhs.net": 840_000}, "subject": "test"},
             {"message_id": "rr1", "timestamp": T0 + 9030, "sender": "a@nhs.net",
              "recipients": ["everyone@nhs.net"], "lists": {"everyone@nhs.net": 840_000},
              "subject": "RE: test", "in_reply_to": "root2"}]
    produce_lines(broker.bootstrap, lines(storm))
    assert wait_for(lambda: worker.get("/api/lists/everyone@nhs.net")["frozen"], timeout=90.0, interval=0.5)
    # The counters move when the scorer's batch is done, after its freeze is published; the freeze shows in
    # /api/lists as soon as it is decided, and publishing right after the outage can take a while (CI once
    # read 150 here). Each record counted once: no more than the 152 produced.
    wait_for(lambda: metric(worker, "stormguard_events_processed_total") >= 152, timeout=30.0,
             what="both storm records to be counted")
    assert metric(worker, "stormguard_events_processed_total") == 152
    assert worker.proc.poll() is None


def test_two_workers_one_killed_mid_storm_survivor_decides_the_same(broker, start_worker, tmp_path):
    before, after = split_bulletin_storm(background_events=600)
    expected = [a for a in offline_actions(before + after, tmp_path) if a["kind"] == "freeze"]
    # Kill whichever worker holds the storm's list (the only list here): the
    # other must adopt its model from the changelog and decide as it would have.
    owner, survivor = two_workers_score(broker, start_worker, before, {"STORMGUARD_PARTITIONS": "4"})
    # Past one commit interval (2.8 s): Faust writes table changelogs through a
    # buffer that its offset commit does not always drain, so a crash inside
    # that window can cost the newest model update (README, Limits).
    time.sleep(3.5)
    owner.kill()
    produce_lines(broker.bootstrap, lines(after))
    wait_for(lambda: [a for a in live_actions(broker) if a["kind"] == "freeze"], timeout=120.0,
             what="the survivor to freeze the storm")
    freezes = [a for a in live_actions(broker) if a["kind"] == "freeze"]
    assert [(a["list"], a["message_id"], a["detector"]) for a in freezes] == \
        [(a["list"], a["message_id"], a["detector"]) for a in expected]
    assert survivor.get("/api/lists/bulletin@nhs.net")["frozen"] is True


def test_burst_lag_drains_and_state_stays_bounded(broker, start_worker):
    worker = start_worker(broker.url, env={"STORMGUARD_MAX_SENDERS": "2000", "STORMGUARD_MAX_LISTS": "100"})
    total = 0
    for burst in range(2):
        events = [{"message_id": f"b{burst}-{i}", "timestamp": T0 + burst * 20_000 + i * 0.2,
                   "sender": f"s{burst}-{i}@nhs.net", "recipients": [f"r{i % 97}@nhs.net"],
                   **({"lists": {f"l{burst}-{i % 400}@nhs.net": 30}} if i % 10 == 0 else {})}
                  for i in range(20_000)]
        produce_lines(broker.bootstrap, lines(events))
        total += len(events)
        wait_for(lambda: metric(worker, "stormguard_events_processed_total") >= total, timeout=240.0,
                 interval=0.5)
        assert metric(worker, "stormguard_tracked_senders") <= 2000
        assert metric(worker, "stormguard_tracked_lists") <= 100
    assert worker.proc.poll() is None
    assert metric(worker, "stormguard_events_invalid_total") == 0


def test_two_workers_starting_together_on_a_full_topic_score_every_record(broker, start_worker):
    """Two workers started at once on a topic already full: the first takes every partition and is
    fetching when the second joins. Seen on Apache Kafka (``make bench``): a fetch awaited across the
    rebalance's seek back to the committed offsets came back with records from before it, was scored,
    and the partition's records before those were then dropped as already read; a quarter of the
    topic was never scored while ``/healthz`` said ok. Two groups in turn, as the race is one of timing.

    And no record is read twice. Faust forgot a revoked partition's acks before committing them, and
    stopped the flow only after that: the first worker went on scoring the backlog meanwhile, and its
    two successors read again all it had scored since its last commit (17,000 to 26,000 of the 30,000
    records a round, 900 to 2,400 of them dead-lettered as late)."""
    from stream_jobs.bench.traffic import encode_all, realistic_events
    from stream_jobs.kafka.topics import ensure_topics

    records = encode_all(realistic_events(30_000, seed=19))
    ensure_topics(broker.url, 8)
    produce_lines(broker.bootstrap, records)
    for _ in range(2):
        first = start_worker(broker.url, wait=False, env={"STORMGUARD_PARTITIONS": "8"})
        second = start_worker(broker.url, wait=False, app_id=first.app_id, env={"STORMGUARD_PARTITIONS": "8"})
        for w in (first, second):
            w.wait_ready(90.0)

        def scored() -> int:
            return sum(w.get("/healthz")["records"] for w in (first, second))

        wait_for(lambda: scored() >= len(records), timeout=150.0, interval=0.5,
                 what=f"two workers to score the {len(records):,} records between them")
        ends = end_offsets(broker.bootstrap)
        deadline = time.monotonic() + 30.0  # a commit interval or two
        while (committed := committed_offsets(broker.bootstrap, first.app_id)) != ends \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert committed == ends, "the group's commits stopped short of the ends of the partitions"
        both = (first, second)
        scored_once = sum(metric(w, "stormguard_events_processed_total") for w in both)
        late = sum(metric(w, "stormguard_events_invalid_total") for w in both)
        assert scored_once <= len(records), "records were read twice: revoked partitions' acks were not committed"
        # A record or two a round is late for real (README Limits: two workers catching up a backlog at
        # different paces); the re-read ones were hundreds.
        assert late <= 5 and scored_once + late >= len(records), (scored_once, late)
        for w in both:
            w.stop()
