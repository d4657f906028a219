"""Faults only a real broker allows: Apache Kafka killed mid-storm and restarted on its data, its
``message.max.bytes`` honoured end to end, ``stormguard.list-state`` really compacted."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from stream_jobs.kafka.apache import KafkaBroker
from stream_jobs.kafka.broker import free_port
from tests.conftest import ROOT, STORMGUARD, http_json, produce_lines, read_topic, wait_for
from tests.scenarios import T0, background, lines, nhsmail_storm

pytestmark = pytest.mark.live


@pytest.fixture
def apache_kafka(tmp_path):
    """Factory: ``apache_kafka(**config)`` starts an Apache Kafka on its own data; stopped after the test's workers
    (ask for this fixture before ``start_worker``: fixtures are torn down in reverse order)."""
    brokers: list[KafkaBroker] = []

    def _start(**config: str) -> KafkaBroker:
        b = KafkaBroker(port=free_port(), data_dir=tmp_path / f"kafka-{len(brokers)}", config=config).start()
        brokers.append(b)
        return b

    yield _start
    for b in brokers:
        b.stop()


def storm(start: float, lst: str, tag: str, replies: int) -> list[dict]:
    """``nhsmail_storm`` with message-ids of its own (a redelivered id is counted once)."""
    events = nhsmail_storm(start, replies=replies, lst=lst)
    for e in events:
        e["message_id"] = f"{tag}-{e['message_id']}"
        if e.get("in_reply_to"):
            e["in_reply_to"] = f"{tag}-{e['in_reply_to']}"
    return events


def list_state(bootstrap: str) -> dict[str, dict]:
    """The newest state of each list on stormguard.list-state."""
    return {r.key.decode(): json.loads(r.value) for r in read_topic(bootstrap, "stormguard.list-state", timeout=10)
            if r.value is not None}


def test_broker_kill_9_mid_storm_then_restart_on_its_data(apache_kafka, start_worker):
    broker = apache_kafka()
    worker = start_worker(broker.url)
    first = background() + storm(T0 + 3000, "all@nhs.net", "a", replies=2)
    produce_lines(broker.bootstrap, lines(first))
    wait_for(lambda: worker.get("/api/lists/all@nhs.net")["frozen"], 90, "the first storm frozen")
    wait_for(lambda: list_state(broker.bootstrap).get("all@nhs.net", {}).get("frozen"), 30,
             "the freeze on stormguard.list-state")
    second = storm(T0 + 6000, "everyone@nhs.net", "b", replies=3)
    produce_lines(broker.bootstrap, lines(second[:1]))  # the storm's first post is acknowledged ...
    broker.kill()  # ... and the broker dies (kill -9) before its reply-alls
    time.sleep(8.0)  # longer than the worker's session timeout
    assert worker.proc.poll() is None, worker.tail()
    broker.start()
    # nothing the broker acknowledged is lost
    ids = {json.loads(r.value)["message_id"] for r in read_topic(broker.bootstrap, "mail.events", timeout=30)}
    assert ids >= {e["message_id"] for e in first + second[:1]}
    produce_lines(broker.bootstrap, lines(second[1:]))
    # the worker recovers by itself: the later storm is frozen, the earlier freeze kept
    wait_for(lambda: worker.get("/api/lists/everyone@nhs.net")["frozen"], 120, f"the later storm frozen\n"
             f"{worker.tail()}")
    assert worker.get("/api/lists/all@nhs.net")["frozen"] is True
    states = list_state(broker.bootstrap)
    assert states["all@nhs.net"]["frozen"] and states["everyone@nhs.net"]["frozen"]
    actions = [json.loads(r.value) for r in read_topic(broker.bootstrap, "stormguard.actions")]
    assert {a["list"] for a in actions if a["kind"] == "freeze"} == {"all@nhs.net", "everyone@nhs.net"}
    assert worker.get("/healthz")["status"] == "ok"


def _postfix_log(qid: str, sender: str, recipients: list[str], message_id: str) -> str:
    stamp = "Nov 27 18:44:17 mx"
    out = [f"{stamp} postfix/cleanup[7673]: {qid}: message-id=<{message_id}>",
           f"{stamp} postfix/qmgr[7541]: {qid}: from=<{sender}>, size=439, nrcpt={len(recipients)} (queue active)"]
    out += [f"{stamp} postfix/smtp[7681]: {qid}: to=<{r}>, relay=mx.example.test[192.0.2.1]:25, delay=0.1, "
            "delays=0.04/0.04/0/0, dsn=2.0.0, status=sent (250 ok)" for r in recipients]
    out.append(f"{stamp} postfix/qmgr[7541]: {qid}: removed")
    return "\n".join(out) + "\n"


def test_message_max_bytes_is_honoured_end_to_end(apache_kafka, start_worker, tmp_path):
    limit = 200_000
    broker = apache_kafka(**{"message.max.bytes": str(limit)})
    worker = start_worker(broker.url, env={"STORMGUARD_WARMUP_EVENTS": "0",
                                           "STORMGUARD_DLQ_MAX_BYTES": "150000"})
    # replay: one record over the broker's limit is refused with a clear error; the others go in
    big_post = storm(T0, "all@nhs.net", "big", replies=0)[0]
    big_post["recipients"] += [f"person{i:05d}@members.nhs.net" for i in range(4000)]  # 124 kB: scored
    not_json = b"<" + b"x" * 160_000 + b">"             # accepted by the broker, dead-lettered
    too_big = json.dumps({**big_post, "message_id": "huge",
                          "recipients": big_post["recipients"] * 2}).encode()  # 248 kB: refused
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([json.dumps(big_post).encode(), too_big, not_json]) + b"\n")
    run = subprocess.run(STORMGUARD + ["replay", str(path), "--broker", broker.url, "--no-progress"],
                         cwd=ROOT, capture_output=True, timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 1, err
    assert f"record 2 ({len(too_big):,} bytes): larger than the broker accepts (its message.max.bytes)" in err
    assert "1 of 3 records refused" in err
    alert = wait_for(lambda: [a for a in (json.loads(r.value) for r in read_topic(broker.bootstrap,
                                                                                   "stormguard.actions"))
                              if a["message_id"] == "big-root"], 60, "the big post scored")
    assert alert[0]["kind"] == "alert"
    dead = wait_for(lambda: [json.loads(r.value) for r in read_topic(broker.bootstrap, "mail.events.dlq")], 60,
                    "the dead letter")
    assert dead[0]["raw_length"] == len(not_json) and dead[0]["raw_truncated"] is True
    assert "huge" not in {json.loads(r.value).get("message_id") for r in read_topic(broker.bootstrap, "mail.events")
                          if r.value.startswith(b"{")}

    # ingest postfix-log: a message to 9,000 addresses makes an event over the limit; the next goes in
    log = tmp_path / "maillog"
    log.write_text(_postfix_log("AAAA1", "spammer@example.test",
                                [f"person{i:05d}@members.example.test" for i in range(9000)], "wide@example.test")
                   + _postfix_log("BBBB2", "alice@example.test", ["bob@example.test"], "small@example.test"))
    run = subprocess.run(STORMGUARD + ["ingest", "postfix-log", str(log), "--broker", broker.url],
                         cwd=ROOT, capture_output=True, timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 1, err
    assert "message <wide@example.test> (" in err and "larger than the broker accepts" in err
    assert "1 message(s) refused by the broker" in err
    ids = [json.loads(r.value).get("message_id") for r in read_topic(broker.bootstrap, "mail.events")
           if r.value.startswith(b"{")]
    assert "<small@example.test>" in ids and "<wide@example.test>" not in ids
    assert worker.proc.poll() is None


def test_list_state_is_really_compacted(apache_kafka, start_worker):
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    broker = apache_kafka()
    worker = start_worker(broker.url, env={"STORMGUARD_ADMIN_TOKEN": "tok"})
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        # the worker made the topic compacted; small segments let the cleaner work within the test
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, "stormguard.list-state", configs={
            "cleanup.policy": "compact", "segment.ms": "200", "min.cleanable.dirty.ratio": "0.001",
            "delete.retention.ms": "100", "min.compaction.lag.ms": "0"})])
    finally:
        admin.close()
    rounds = 6

    def newest_ops_state():
        records = [r for r in read_topic(broker.bootstrap, "stormguard.list-state") if r.key == b"ops@nhs.net"]
        return json.loads(records[-1].value)["frozen"] if records else None

    for i in range(rounds):
        for verb, frozen in (("freeze", True), ("unfreeze", False)):
            status, body = http_json(f"{worker.url}/api/lists/ops@nhs.net/{verb}", "POST",
                                     {"actor": "alice", "reason": f"{verb} {i}"}, token="tok")
            assert status == 200, body
            wait_for(lambda: newest_ops_state() is frozen, 30, f"the {verb} on stormguard.list-state")
            time.sleep(0.3)  # each state in a segment of its own (segment.ms 200)
    written = 2 * rounds

    def compacted():
        # a record to another key after the segments rolled, so the cleaner may take the old ones
        status, _ = http_json(f"{worker.url}/api/lists/filler@nhs.net/freeze", "POST", {"actor": "b"}, token="tok")
        records = [r for r in read_topic(broker.bootstrap, "stormguard.list-state") if r.key == b"ops@nhs.net"]
        return records if len(records) < written else None

    records = wait_for(compacted, 120, "the log cleaner to compact stormguard.list-state", interval=2.0)
    newest = json.loads(records[-1].value)
    assert newest["frozen"] is False
    assert records[0].offset > 0  # the oldest values are gone from the log, not only shadowed
