"""The live pipeline against a real embedded broker and real worker processes."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.conftest import ROOT, STORMGUARD, http_json, produce_lines, read_topic, wait_for
from tests.scenarios import BAD_RECORDS, T0, background, bulletin_storm, lines, nhsmail_storm

pytestmark = [pytest.mark.live, pytest.mark.both_brokers]


def _actions(broker) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(broker.bootstrap, "stormguard.actions")]


def test_storm_is_frozen_live_and_bad_records_are_dead_lettered(broker, start_worker):
    worker = start_worker(broker.url)
    assert worker.get("/api/lists/all@nhs.net")["frozen"] is False

    events = background() + nhsmail_storm(T0 + 3000)
    produce_lines(broker.bootstrap, lines(events) + BAD_RECORDS)

    status = wait_for(lambda: (s := worker.get("/api/lists/all@nhs.net"))["frozen"] and s)
    assert status["list"] == "all@nhs.net" and status["since"] == T0 + 3000 + 40
    assert "anomalous" in status["reason"]

    freezes = wait_for(lambda: [a for a in _actions(broker) if a["kind"] == "freeze"])
    assert len(freezes) == 1, freezes  # idempotent: later replies do not freeze again
    assert freezes[0]["message_id"] == "reply0" and freezes[0]["list"] == "all@nhs.net"

    dlq = wait_for(lambda: (r := read_topic(broker.bootstrap, "mail.events.dlq")) and len(r) >= len(BAD_RECORDS) and r)
    envelopes = [json.loads(r.value) for r in dlq]
    assert len(envelopes) == len(BAD_RECORDS)
    import base64
    assert sorted(base64.b64decode(e["raw_base64"]) for e in envelopes) == sorted(BAD_RECORDS)
    assert all(e["reason"] for e in envelopes)

    state = [json.loads(r.value) for r in read_topic(broker.bootstrap, "stormguard.list-state")]
    assert state and state[-1]["list"] == "all@nhs.net" and state[-1]["frozen"] is True

    metrics = urllib_get(worker.url + "/metrics")
    assert f"stormguard_events_processed_total {float(len(events))}" in metrics
    invalid = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("stormguard_events_invalid_total"))
    assert invalid == len(BAD_RECORDS)
    assert 'stormguard_actions_total{detector="reply_to_anomalous_post",kind="freeze"} 1.0' in metrics


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


@pytest.mark.parametrize("fast_drain", ["true", "false"], ids=["batched-drain", "stock-faust-drain"])
def test_live_and_offline_take_the_same_decisions(broker, start_worker, tmp_path, fast_drain):
    """One decision path: `stormguard score` and the live worker agree action for action.

    With the worker's batched drain (the default) and with Faust's own (``STORMGUARD_FAST_DRAIN=false``).
    """
    events = background(300) + nhsmail_storm(T0 + 4000, replies=5)
    # A second storm whose first post is ordinary: a bulletin from its usual owner, then reply-alls.
    events += bulletin_storm(replies=5)
    events.sort(key=lambda e: e["timestamp"])
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines(events)) + b"\n")

    offline = subprocess.run(STORMGUARD + ["score", str(path)], cwd=ROOT, capture_output=True, check=True)
    offline_actions = [json.loads(l) for l in offline.stdout.splitlines()]
    assert [a["kind"] for a in offline_actions].count("freeze") == 2, offline_actions

    start_worker(broker.url, env={"STORMGUARD_FAST_DRAIN": fast_drain})
    produce_lines(broker.bootstrap, lines(events))
    live_actions = wait_for(lambda: (a := _actions(broker)) and len(a) >= len(offline_actions) and a)
    key = lambda a: (a["kind"], a["list"], a["message_id"], a["detector"], a["score"], a["action_id"])
    assert [key(a) for a in live_actions] == [key(a) for a in offline_actions]


def test_a_backlog_is_caught_up_then_the_worker_is_live(broker, start_worker):
    """Records produced before the worker started are a backlog (/healthz says so, and the collector is
    relaxed meanwhile, worker/heap.py); the first fresh record puts the worker back to live pace."""
    produce_lines(broker.bootstrap, lines(background(200)))
    time.sleep(1.5)  # older than the worker's catch-up mark (1 s) by the time it reads them
    worker = start_worker(broker.url)
    health = wait_for(lambda: (h := worker.get("/healthz")).get("records", 0) >= 200 and h)
    assert health["catching_up"] is True
    produce_lines(broker.bootstrap, lines(background(1, start=T0 + 5000)))
    wait_for(lambda: worker.get("/healthz")["catching_up"] is False, what="the worker back to live pace")


def _saved_models(broker, worker, address: str) -> list:
    """Every model of ``address`` in the worker's changelog, oldest first (raw bytes on the wire: the pickle)."""
    import pickle

    return [pickle.loads(r.value) for r in read_topic(broker.bootstrap, f"{worker.app_id}-list_models-changelog")
            if r.key == f'"{address}"'.encode()]


def test_list_models_reach_the_changelog_once_traffic_stops(broker, start_worker):
    """No record comes after the last post: the save timer, not the next batch, writes the model."""
    worker = start_worker(broker.url, env={"STORMGUARD_MODEL_SAVE_MS": "2000"})
    posts = [{"message_id": f"team{i}", "timestamp": T0 + 60 * i, "sender": f"u{i % 3}@nhs.net",
              "recipients": ["team@nhs.net"], "lists": {"team@nhs.net": 12}, "subject": f"note {i}"}
             for i in range(7)]
    # A batch saves only models that have waited 2 s; no batch comes after the last post,
    # so only the timer can save it.
    produce_lines(broker.bootstrap, lines(posts[:6]))
    wait_for(lambda: worker.get("/healthz").get("records", 0) >= 6)
    produce_lines(broker.bootstrap, lines(posts[6:]))
    wait_for(lambda: worker.get("/healthz").get("records", 0) >= 7)

    states = wait_for(lambda: (s := _saved_models(broker, worker, "team@nhs.net")) and s[-1].posts == 7 and s, timeout=15, what="the 7th post saved")
    assert all(state.address == "team@nhs.net" for state in states)


def test_list_models_are_saved_before_their_records_offsets_are_committed(broker, start_worker):
    """The save wait is ten minutes, and the worker keeps running: only the save Faust's offset
    commit triggers (every 2.8 s) can write the model, so a crash after the commit loses nothing."""
    worker = start_worker(broker.url, env={"STORMGUARD_MODEL_SAVE_MS": "600000"})
    posts = [{"message_id": f"ops{i}", "timestamp": T0 + 60 * i, "sender": f"u{i % 3}@nhs.net",
              "recipients": ["ops@nhs.net"], "lists": {"ops@nhs.net": 40}, "subject": f"rota {i}"}
             for i in range(5)]
    produce_lines(broker.bootstrap, lines(posts))
    wait_for(lambda: worker.get("/healthz").get("records", 0) >= 5)

    states = wait_for(lambda: (s := _saved_models(broker, worker, "ops@nhs.net")) and s[-1].posts == 5 and s, timeout=20,
                      what="the model saved by the commit")
    assert worker.proc.poll() is None  # not the save on the way out
    assert states[-1].address == "ops@nhs.net"


def test_restart_keeps_every_freeze(broker, start_worker):
    worker = start_worker(broker.url)
    produce_lines(broker.bootstrap, lines(background() + nhsmail_storm(T0 + 3000, replies=2)))
    wait_for(lambda: worker.get("/api/lists/all@nhs.net")["frozen"])
    time.sleep(3.5)  # past Faust's commit interval, so the changelog is written
    worker.kill()

    again = start_worker(broker.url, app_id=worker.app_id)
    status = again.get("/api/lists/all@nhs.net")
    assert status["frozen"] is True and "anomalous" in status["reason"]
    # More reply-alls after the restart do not produce a second freeze.
    produce_lines(broker.bootstrap, lines([{"message_id": "late-reply", "timestamp": T0 + 3200,
                                            "sender": "z@nhs.net", "recipients": ["all@nhs.net"],
                                            "lists": {"all@nhs.net": 840_000}, "subject": "RE: test",
                                            "in_reply_to": "root"}]))
    time.sleep(2)
    assert [a["kind"] for a in _actions(broker)].count("freeze") == 1


def test_admin_api_needs_a_token_and_records_who_and_why(broker, start_worker):
    open_worker = start_worker(broker.url)
    code, body = http_json(open_worker.url + "/api/lists/ops@nhs.net/freeze", "POST", {"reason": "x"})
    assert code == 403 and "STORMGUARD_ADMIN_TOKEN" in body["error"]
    open_worker.stop()

    worker = start_worker(broker.url, env={"STORMGUARD_ADMIN_TOKEN": "s3cret-token"})
    # Forged or broken commands on the commands topic are refused without stopping the worker.
    produce_lines(broker.bootstrap, [b"garbage", b"[1, 2]", b'{"kind": "explode", "list": "x", "at": 1}'],
                  topic="stormguard.commands")
    code, body = http_json(worker.url + "/api/lists/ops@nhs.net/freeze", "POST", {"reason": "x"}, token="wrong")
    assert code == 401 and "s3cret" not in json.dumps(body)
    code, body = http_json(worker.url + "/api/lists/ops@nhs.net/freeze", "POST",
                           {"reason": "planned migration", "actor": "alice"}, token="s3cret-token")
    assert code == 200 and body["applied"] is True and body["status"]["frozen"] is True
    assert worker.get("/api/lists/ops@nhs.net")["actor"] == "alice"
    code, body = http_json(worker.url + "/api/lists/ops@nhs.net/unfreeze", "POST", {"actor": "bob"},
                           token="s3cret-token")
    assert code == 200 and body["status"]["frozen"] is False
    published = wait_for(lambda: (a := _actions(broker)) and len(a) >= 2 and a)
    ops = [a for a in published if a["list"] == "ops@nhs.net"]
    assert [(a["kind"], a["actor"], a["detector"]) for a in ops] == [("freeze", "alice", "operator"),
                                                                    ("unfreeze", "bob", "operator")]
    assert ops[0]["reason"] == "planned migration"


def test_shadow_mode_decides_and_publishes_but_holds_nothing(broker, start_worker, tmp_path):
    """STORMGUARD_ENFORCE=false: the same decisions as `stormguard score` in shadow mode, each with
    "enforced": false; no list is frozen for gateways (list-state) or operators (/api/lists)."""
    import os

    events = background() + nhsmail_storm(T0 + 3000, replies=3)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines(events)) + b"\n")
    offline = subprocess.run(STORMGUARD + ["score", str(path)], cwd=ROOT, capture_output=True, check=True,
                             env={**os.environ, "STORMGUARD_ENFORCE": "false"})
    offline_actions = [json.loads(l) for l in offline.stdout.splitlines()]
    assert offline_actions and all(a["enforced"] is False for a in offline_actions)

    worker = start_worker(broker.url, env={"STORMGUARD_ENFORCE": "false"})
    produce_lines(broker.bootstrap, lines(events))
    live = wait_for(lambda: (a := _actions(broker)) and len(a) >= len(offline_actions) and a)
    assert live == offline_actions
    assert [a["kind"] for a in live].count("freeze") == 1
    assert worker.get("/api/lists/all@nhs.net")["frozen"] is False
    listed = worker.get("/api/lists")
    assert listed["frozen"] == [] and [s["list"] for s in listed["would_freeze"]] == ["all@nhs.net"]
    assert read_topic(broker.bootstrap, "stormguard.list-state") == []
