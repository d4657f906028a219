"""The thin shell around the core: settings, the embedded broker, routing, the `score` command."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from detectors.policy import PolicyConfig
from stream_jobs.kafka.broker import BrokerError, EmbeddedBroker, free_port
from stream_jobs.kafka.replay import bootstrap_servers, routing_key
from stream_jobs.settings import SettingsError, WorkerSettings, policy_from_env, secret
from tests.conftest import ROOT, STORMGUARD
from tests.scenarios import BAD_RECORDS, T0, background, lines, nhsmail_storm


def test_policy_overrides_from_environment():
    cfg = policy_from_env({"STORMGUARD_MIN_REPLIES": "5", "STORMGUARD_COOLDOWN": "60",
                           "STORMGUARD_ALLOW_LISTS": "a@x, b@x", "STORMGUARD_UNRELATED": "1"})
    assert cfg.min_replies == 5 and cfg.cooldown == 60.0 and cfg.allow_lists == frozenset({"a@x", "b@x"})
    assert cfg.fanout_z == PolicyConfig().fanout_z


@pytest.mark.parametrize("env, name", [({"STORMGUARD_MIN_REPLIES": "three"}, "STORMGUARD_MIN_REPLIES"),
                                       ({"STORMGUARD_COOLDOWN": "-1"}, "cooldown"),
                                       ({"STORMGUARD_PARTITIONS": "0"}, "STORMGUARD_PARTITIONS"),
                                       ({"STORMGUARD_FAST_DRAIN": "maybe"}, "STORMGUARD_FAST_DRAIN"),
                                       ({"STORMGUARD_MODEL_SAVE_MS": "-5"}, "STORMGUARD_MODEL_SAVE_MS"),
                                       ({"STORMGUARD_GC_FREEZE_S": "-1"}, "STORMGUARD_GC_FREEZE_S"),
                                       ({"STORMGUARD_GC_CATCH_UP_THRESHOLD": "-1"},
                                        "STORMGUARD_GC_CATCH_UP_THRESHOLD")])
def test_bad_settings_name_the_setting(env, name):
    with pytest.raises(SettingsError, match=name):
        WorkerSettings.from_env(env)


def test_consumer_tuning_settings():
    assert WorkerSettings.from_env({}).fast_drain is True
    assert WorkerSettings.from_env({"STORMGUARD_FAST_DRAIN": "off"}).fast_drain is False
    assert WorkerSettings.from_env({"STORMGUARD_MODEL_SAVE_MS": "0"}).model_save_ms == 0
    assert WorkerSettings.from_env({}).gc_catch_up_threshold == 2_000_000
    assert WorkerSettings.from_env({"STORMGUARD_GC_CATCH_UP_THRESHOLD": "0"}).gc_catch_up_threshold == 0


def test_secrets_come_from_env_or_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert secret("TOKEN", {"TOKEN_FILE": str(path)}) == "from-file"
    assert secret("TOKEN", {"TOKEN": "direct", "TOKEN_FILE": str(path)}) == "direct"
    with pytest.raises(SettingsError, match="TOKEN_FILE") as err:
        secret("TOKEN", {"TOKEN_FILE": str(tmp_path / "missing")})
    assert "from-file" not in str(err.value)


def test_sasl_needs_credentials():
    with pytest.raises(SettingsError, match="SASL"):
        WorkerSettings.from_env({"STORMGUARD_KAFKA_SASL_MECHANISM": "PLAIN"}).kafka_client_options()
    opts = WorkerSettings.from_env({"STORMGUARD_KAFKA_SASL_MECHANISM": "PLAIN", "STORMGUARD_KAFKA_SASL_USERNAME": "u",
                                    "STORMGUARD_KAFKA_SASL_PASSWORD": "p"}).kafka_client_options()
    assert opts["broker_credentials"].mechanism.value == "PLAIN"


def test_records_are_keyed_by_list_then_sender():
    assert routing_key(b'{"sender": "a@x", "lists": {"z@x": 5, "b@x": 9}}') == b"b@x"
    assert routing_key(b'{"sender": "a@x", "recipients": ["q@x"]}') == b"a@x"
    assert routing_key(b"not json") is None
    assert bootstrap_servers("kafka://h1:9092;kafka://h2:9093") == ["h1:9092", "h2:9093"]


def test_embedded_broker_starts_listens_and_stops():
    port = free_port()
    with EmbeddedBroker(port=port) as broker:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        with pytest.raises(BrokerError, match="already in use"):
            EmbeddedBroker(port=port).start()
    assert broker.proc.poll() is not None


def test_score_prints_actions_in_input_order_and_reports_dead_letters(tmp_path):
    path = tmp_path / "in.jsonl"
    events = background() + nhsmail_storm(T0 + 3000, replies=3)
    path.write_bytes(b"\n".join(lines(events) + BAD_RECORDS[:2]) + b"\n")
    dead = tmp_path / "dead.jsonl"
    run = subprocess.run(STORMGUARD + ["score", str(path), "--dead-letters", str(dead)], cwd=ROOT,
                         capture_output=True, check=True)
    actions = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(a["kind"], a["message_id"]) for a in actions] == [("alert", "root"), ("freeze", "reply0")]
    assert b"2 dead-lettered" in run.stderr
    rejected = [json.loads(line) for line in dead.read_bytes().splitlines()]
    assert [r["record"] for r in rejected] == [len(events) + 1, len(events) + 2]
    assert all(r["reason"] for r in rejected)


def test_score_from_stdin_and_missing_file():
    events = background(120) + nhsmail_storm(T0 + 2000, replies=1)
    run = subprocess.run(STORMGUARD + ["score", "-"], cwd=ROOT, input=b"\n".join(lines(events)),
                         capture_output=True, check=True)
    assert b'"kind":"freeze"' in run.stdout
    missing = subprocess.run(STORMGUARD + ["score", "/nonexistent.jsonl"], cwd=ROOT, capture_output=True)
    assert missing.returncode == 2 and b"no such file" in missing.stderr


def test_replay_without_a_broker_says_so(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines(background(3))))
    run = subprocess.run(STORMGUARD + ["replay", str(path), "--broker", f"kafka://127.0.0.1:{free_port()}",
                                       "--no-progress"], cwd=ROOT, capture_output=True, timeout=120)
    assert run.returncode == 1 and b"no Kafka broker answers" in run.stderr


def test_kafka_python_clients_get_the_same_tls_and_sasl(tmp_path):
    plain = WorkerSettings.from_env({}).kafka_python_options()
    assert plain == {}
    sasl = WorkerSettings.from_env({"STORMGUARD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                                    "STORMGUARD_KAFKA_SASL_USERNAME": "sg",
                                    "STORMGUARD_KAFKA_SASL_PASSWORD": "pw"}).kafka_python_options()
    assert sasl == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_plain_username": "sg", "sasl_plain_password": "pw"}
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    tls = WorkerSettings.from_env({"STORMGUARD_KAFKA_SSL_CAFILE": str(ca), "STORMGUARD_KAFKA_SASL_MECHANISM": "PLAIN",
                                   "STORMGUARD_KAFKA_SASL_USERNAME": "sg",
                                   "STORMGUARD_KAFKA_SASL_PASSWORD": "pw"}).kafka_python_options()
    assert tls["security_protocol"] == "SASL_SSL" and tls["ssl_cafile"] == str(ca)


def test_event_order_merges_partitions_and_waits_for_one_that_is_behind():
    """The consumer scheduler: oldest event first across partitions; a partition that ran dry while
    the broker has more of it holds back newer records, for at most max_wait; junk goes at once."""
    from collections import namedtuple

    from stream_jobs.worker.event_order import EventTimeScheduler

    TP, Rec = namedtuple("TP", "topic partition"), namedtuple("Rec", "offset value")
    a, b, other = TP("mail.events", 0), TP("mail.events", 1), TP("stormguard.commands", 0)
    ev = lambda t: b'{"timestamp": %d}' % t  # noqa: E731
    clock = [0.0]
    behind = {b}
    s = EventTimeScheduler(ordered_topics={"mail.events"}, clock=lambda: clock[0])
    s.has_backlog = lambda tp: tp in behind
    s.max_wait = 2.0
    got = lambda records: [(tp.partition, r.value) for tp, r in s.iterate(records)]  # noqa: E731
    first = got({a: [Rec(0, ev(1)), Rec(1, ev(50)), Rec(2, b"junk")], b: [Rec(0, ev(10))], other: [Rec(0, b"c")]})
    # b ran dry at event time 10 and is behind: a's record at 50 waits, and the junk behind it in a
    assert first == [(0, b"c"), (0, ev(1)), (1, ev(10))]
    assert s.held == 2
    assert got({b: [Rec(1, ev(20))]})[0] == (1, ev(20))  # b's next fetch: its 20 before a's 50
    clock[0] = 5.0  # b stays behind and silent past max_wait: a's records go anyway
    rest = got({})
    assert (0, ev(50)) in rest and s.held == 0 and s.released_early >= 1
    behind.clear()
    assert got({a: [Rec(3, ev(60))]}) == [(0, ev(60))]  # caught up: nothing waits


def test_whole_backlog_partitions_in_one_fetch_wait_for_a_partition_that_has_given_nothing():
    """Tansu answers a fetch of a backlog partition with far more than the 1 MiB asked for (22,000 records
    of mail.events seen), so seven partitions' first fetches can bring 150,000 records before the eighth
    brings any: they are held, not let through out of order (at 50,000 held, hundreds of records were
    then dead-lettered as late)."""
    from collections import namedtuple

    from stream_jobs.worker.event_order import EventTimeScheduler

    TP, Rec = namedtuple("TP", "topic partition"), namedtuple("Rec", "offset value")
    tps = [TP("mail.events", p) for p in range(8)]
    late = tps[7]
    s = EventTimeScheduler(ordered_topics={"mail.events"}, clock=lambda: 0.0)
    s.assigned = lambda: tps
    s.has_backlog = lambda tp: True
    per_partition = 21_500
    # partition p holds events p, p + 8, p + 16, ...: one stream, spread as a sender-keyed backlog is
    fetch = {tp: [Rec(o, b'{"timestamp": %d}' % (o * 8 + tp.partition)) for o in range(per_partition)]
             for tp in tps[:7]}
    assert list(s.iterate(fetch)) == [] and s.held == 7 * per_partition and s.released_early == 0
    released = [json.loads(r.value)["timestamp"] for _, r in s.iterate(
        {late: [Rec(o, b'{"timestamp": %d}' % (o * 8 + 7)) for o in range(per_partition)]})]
    assert released[:16] == list(range(16)) and released == sorted(released) and s.released_early == 0
