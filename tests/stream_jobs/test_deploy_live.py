"""A deployment into a world Stormguard did not make: topics that exist, records of any size,
traffic keyed by sender, a backlog to catch up, an agent that dies (issue 13)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time

import pytest

from stream_jobs.worker.processes import WorkerProcess
from tests.conftest import ROOT, STORMGUARD, http_json, read_topic, wait_for
from tests.scenarios import T0, background, lines, nhsmail_storm

pytestmark = pytest.mark.live


#: A worker catching up after an outage, not a first deployment: the backlog is acted on, not
#: learned as history (test_history_live.py covers the first start).
CATCHING_UP = {"STORMGUARD_LEARN_HISTORY": "false"}


def _create_topic(bootstrap: str, name: str, partitions: int, **configs) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    try:
        admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
    finally:
        admin.close()


def _produce(bootstrap: str, records: list[bytes], key=None, **config) -> None:
    """Produce as a gateway that knows nothing of lists: keyed by ``key(record)`` (None: unkeyed)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=[bootstrap], linger_ms=5, **config)
    try:
        for raw in records:
            producer.send("mail.events", value=raw, key=key(raw) if key else None)
        producer.flush()
    finally:
        producer.close()


def by_sender(raw: bytes):
    return json.loads(raw)["sender"].encode()


def _actions(broker) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(broker.bootstrap, "stormguard.actions")]


def _dead_letters(broker) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(broker.bootstrap, "mail.events.dlq")]


def slow_storm(start: float, replies: int = 12) -> list[dict]:
    """The NHSmail shape, its reply-alls a minute apart: the storm outlasts STORMGUARD_MAX_LATENESS,
    so scoring its partitions out of order dead-letters its first post or its replies as late."""
    storm = nhsmail_storm(start, replies=replies)
    for j, reply in enumerate(storm[1:]):
        reply["timestamp"] = start + 40 + 60 * j
    return storm


def backlog(n: int = 12_000) -> list[dict]:
    """Hours of ordinary mail from many senders, then the storm, all in the topic before the worker starts."""
    events = background(n, people=400) + slow_storm(T0 + 10 * n + 60)
    return sorted(events, key=lambda e: e["timestamp"])


def _score_offline(tmp_path, events: list[dict]) -> list[dict]:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines(events)) + b"\n")
    out = subprocess.run(STORMGUARD + ["score", str(path)], cwd=ROOT, capture_output=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def decisions(actions: list[dict]) -> list[tuple]:
    return sorted((a["kind"], a["list"], a["message_id"], a["detector"], a["action_id"]) for a in actions)


def test_an_existing_six_partition_topic_is_followed(broker, start_worker, tmp_path):
    """mail.events made by the operator with 6 partitions, the worker on its defaults (1)."""
    _create_topic(broker.bootstrap, "mail.events", 6)
    events = backlog(3000)
    _produce(broker.bootstrap, lines(events), key=by_sender)
    worker = start_worker(broker.url, env=CATCHING_UP)
    assert worker.get("/healthz")["partitions"] == 6
    freeze = wait_for(lambda: [a for a in _actions(broker) if a["kind"] == "freeze"], timeout=60)
    assert freeze[0]["message_id"] == "reply0", json.dumps([_actions(broker), _dead_letters(broker)[:3], worker.get("/healthz")])  # one reply-all delivered
    wait_for(lambda: worker.get("/healthz")["records"] >= len(events), what="every record scored")
    log = worker.tail(200_000)
    assert "PartitionsMismatch" not in log and "could not save" not in log
    from kafka import KafkaConsumer
    consumer = KafkaConsumer(bootstrap_servers=[broker.bootstrap])
    try:
        for topic in (f"{worker.app_id}-list_models-changelog", f"{worker.app_id}-mail.events-by-list",
                      "stormguard.actions", "stormguard.list-state"):
            assert len(wait_for(lambda: consumer.partitions_for_topic(topic), what=topic)) == 6, topic
    finally:
        consumer.close()


def test_a_topic_that_cannot_agree_stops_the_start_with_the_fix(broker, tmp_path):
    _create_topic(broker.bootstrap, "mail.events", 6)
    _create_topic(broker.bootstrap, "mismatch-list_models-changelog", 2)
    env = {"STORMGUARD_APP_ID": "mismatch", "STORMGUARD_BROKER": broker.url, "PATH": "/usr/bin:/bin"}
    run = subprocess.run(STORMGUARD + ["run", "--web-port", "0"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "mismatch-list_models-changelog has 2 partition(s); Stormguard needs 6" in run.stderr
    assert "--alter --topic mismatch-list_models-changelog --partitions 6" in run.stderr


def test_a_record_bigger_than_any_dead_letter_does_not_stop_scoring(broker, start_worker):
    """A 3.8 MB record the broker accepted: its dead letter keeps a prefix, its length and its SHA-256."""
    worker = start_worker(broker.url)
    huge = b'{"message_id": "huge", "junk": "' + b"x" * 3_800_000 + b'"}'
    _produce(broker.bootstrap, [huge], max_request_size=8_000_000)
    events = background() + nhsmail_storm(T0 + 3000, replies=3)
    _produce(broker.bootstrap, lines(events), key=by_sender)

    freeze = wait_for(lambda: [a for a in _actions(broker) if a["kind"] == "freeze"], timeout=60)
    assert freeze[0]["message_id"] == "reply0"
    letter = wait_for(lambda: _dead_letters(broker))[0]
    assert letter["raw_truncated"] is True and letter["raw_length"] == len(huge)
    assert letter["raw_sha256"] == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(base64.b64decode(letter["raw_base64"])) and "over the" in letter["reason"]
    status, health = http_json(worker.url + "/healthz")
    assert status == 200 and health["dead_letter_failures"] == 0


@pytest.mark.parametrize("keys", ["sender", "none"])
def test_a_backlog_keyed_by_sender_is_scored_in_event_time_order(broker, start_worker, tmp_path, keys):
    """Six partitions read unevenly while catching up: no event is late, the storm is frozen on its
    first reply-all, and the decisions are `stormguard score`'s on the same stream."""
    _create_topic(broker.bootstrap, "mail.events", 6)
    events = backlog()
    offline = _score_offline(tmp_path, events)
    assert [a["message_id"] for a in offline if a["kind"] == "freeze"] == ["reply0"]

    _produce(broker.bootstrap, lines(events), key=by_sender if keys == "sender" else None)
    worker = start_worker(broker.url, env=CATCHING_UP)
    wait_for(lambda: worker.get("/healthz")["records"] >= len(events), timeout=120, what="the backlog scored")
    assert _dead_letters(broker) == []  # nothing late
    live = wait_for(lambda: (a := _actions(broker)) and len(a) >= len(offline) and a)
    assert decisions(live) == decisions(offline)


def test_two_workers_score_each_list_where_it_lives(broker, tmp_path):
    """Keyed by sender, four partitions, two workers: each list's posts reach the worker that owns the
    list (through the by-list topic), and the decisions are `stormguard score`'s."""
    _create_topic(broker.bootstrap, "mail.events", 4)
    events = background(2000, people=200) + nhsmail_storm(T0 + 21_000, replies=4)
    events += [{"message_id": f"two{i}", "timestamp": T0 + 21_100 + i, "sender": f"p{i}@nhs.net",
                "recipients": ["a@nhs.net", "b@nhs.net"], "lists": {"a@nhs.net": 300, "b@nhs.net": 400},
                "subject": f"joint {i}"} for i in range(6)]
    events.sort(key=lambda e: e["timestamp"])
    offline = _score_offline(tmp_path, events)

    workers = [WorkerProcess(broker.url, tmp_path, app_id="pair",
                             env={"STORMGUARD_DATA_DIR": str(tmp_path / f"data-{i}")}).start() for i in range(2)]
    try:
        for w in workers:
            w.wait_ready(90)
        wait_for(lambda: all(http_json(w.url + "/healthz")[0] == 200 for w in workers), timeout=60)
        # the day's mail as a backlog, then the storm as it happens: a message every few hundred ms
        # (two workers route independently; between them, only what happens in order arrives in order)
        calm = [e for e in events if e["timestamp"] < T0 + 21_000]
        _produce(broker.bootstrap, lines(calm), key=by_sender)
        wait_for(lambda: sum(http_json(w.url + "/healthz")[1].get("records", 0) for w in workers)
                 >= len(calm), timeout=90, what="the backlog read")
        for event in events[len(calm):]:
            _produce(broker.bootstrap, lines([event]), key=by_sender)
            time.sleep(0.3)
        wait_for(lambda: sum(http_json(w.url + "/healthz")[1].get("records", 0) for w in workers)
                 >= len(events), timeout=90, what="every record read")
        live = wait_for(lambda: (a := _actions(broker)) and len(a) >= len(offline) and a, timeout=30)
        assert decisions(live) == decisions(offline)
        owners = [w for w in workers if http_json(w.url + "/api/lists/all@nhs.net")[1]["frozen"]]
        assert len(owners) == 1  # the list lives on one worker
        # the two-list posts reached each list once: each list's model counted all six
        import pickle
        models = {}
        for r in read_topic(broker.bootstrap, "pair-list_models-changelog"):
            if r.key in (b'"a@nhs.net"', b'"b@nhs.net"'):
                models[r.key] = pickle.loads(r.value)
        assert {k: m.posts for k, m in models.items()} == {b'"a@nhs.net"': 6, b'"b@nhs.net"': 6}
    finally:
        for w in workers:
            w.stop()


def test_a_dead_agent_turns_health_red_and_the_worker_exits(broker, tmp_path):
    worker = WorkerProcess(broker.url, tmp_path, env={"STORMGUARD_CRASH_ON_MESSAGE_ID": "bg7"}).start()
    try:
        worker.wait_ready(90)
        _produce(broker.bootstrap, lines(background(20)))
        body = wait_for(lambda: (r := http_json(worker.url + "/healthz"))[0] == 503 and r[1], timeout=30,
                        interval=0.05, what="/healthz 503")
        assert "score" in body["dead_agents"] and "drill" in body["dead_agents"]["score"]
        code = worker.proc.wait(timeout=20)
        assert code not in (0, None), code
    finally:
        worker.stop()


def test_a_big_backlog_keyed_by_sender_on_eight_partitions_decides_as_offline(broker, start_worker, tmp_path):
    """The bench's mail (30,000 events, a storm among them) keyed by sender on 8 partitions, all in the
    topic before the worker starts: every list post's share is scored for the list that owns it in event
    time order, none is late, and the decisions are `stormguard score`'s on the same records. (Before
    issue 19's round 2, the merge let records through before some partitions had given any, and after
    2 s of waiting in all, however much it had moved meanwhile: hundreds of shares were dead-lettered
    as late and the decisions differed.)"""
    from stream_jobs.bench.traffic import by_list_shares, encode_all, realistic_events, sender_key

    records = encode_all(realistic_events(30_000, seed=2016))
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(records) + b"\n")
    out = subprocess.run(STORMGUARD + ["score", str(path)], cwd=ROOT, capture_output=True, check=True)
    offline = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a for a in offline if a["kind"] == "freeze"]

    _create_topic(broker.bootstrap, "mail.events", 8)
    _produce(broker.bootstrap, records, key=sender_key)
    worker = start_worker(broker.url, env=CATCHING_UP)
    total = len(records) + by_list_shares(records, sender_key, 8)  # a share counts as a record, here or routed
    wait_for(lambda: worker.get("/healthz")["records"] >= total, timeout=180, what="the backlog scored")
    assert _dead_letters(broker) == []
    live = wait_for(lambda: (a := _actions(broker)) and len(a) >= len(offline) and a, timeout=30)
    assert decisions(live) == decisions(offline)
