"""``stormguard deliver`` end to end: real embedded broker, real processes, real receivers on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from detectors.policy import Action, encode_action
from stream_jobs.kafka.broker import free_port
from stream_jobs.worker.processes import ChildProcess
from stream_jobs.settings import ACTIONS_TOPIC
from tests.conftest import ROOT, STORMGUARD, http_json, read_topic
from tests.stream_jobs.receivers import FakeGrafana, RecordingServer, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"stormguard-deliver-test-secret!!").decode()
T0 = 1479376800.0


class DeliverProcess(ChildProcess):
    """``stormguard -v deliver`` in a child process, with short retries for the tests."""

    def __init__(self, broker_url: str, tmp: Path, env: dict):
        port = free_port()
        super().__init__(STORMGUARD + ["-v", "deliver", "--broker", broker_url, "--web-port", str(port)],
                         tmp / f"deliver-{port}.log",
                         {**os.environ, "PYTHONUNBUFFERED": "1", "STORMGUARD_DELIVER_BACKOFF_BASE": "0.1",
                          "STORMGUARD_DELIVER_BACKOFF_MAX": "1", "STORMGUARD_DELIVER_TIMEOUT": "3", **env},
                         web_port=port, name="deliver")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str) -> float:
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", self.metrics(), re.M)
        return float(m.group(1)) if m else float("nan")

    def stop(self) -> int:
        super().stop(timeout=20)
        return self.proc.returncode if self.proc else 0

    def log(self) -> str:
        return self.tail(6000)


@pytest.fixture
def start_deliver(tmp_path):
    procs: list[DeliverProcess] = []

    def _start(broker_url: str, env: dict) -> DeliverProcess:
        p = DeliverProcess(broker_url, tmp_path, env).start()
        procs.append(p)
        return p

    yield _start
    for p in procs:
        p.stop()


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def produce_actions(bootstrap: str, actions: list[Action], raw: list[bytes] = ()) -> None:
    from stream_jobs.kafka.replay import make_producer

    producer = make_producer(f"kafka://{bootstrap}")
    try:
        for a in actions:  # keyed as the worker keys them: list, else sender
            producer.send(ACTIONS_TOPIC, value=encode_action(a), key=(a.list or a.sender).encode())
        for r in raw:
            producer.send(ACTIONS_TOPIC, value=r, key=b"junk")
        producer.flush()
    finally:
        producer.close()


def storm_actions(lists: range, t: float, unfreeze_every: int = 3) -> list[Action]:
    """A storm across many lists: alert, freeze, and for some lists the unfreeze."""
    out = []
    for i in lists:
        lst = f"list{i}@nhs.net"
        out.append(Action(kind="alert", list=lst, sender=f"s{i}@nhs.net", event_time=t + i, detector="fanout",
                          score=5.0, message_id=f"<root{i}>", reason="unusual fan-out"))
        out.append(Action(kind="freeze", list=lst, sender=f"r{i}@nhs.net", event_time=t + i + 30,
                          detector="reply_to_anomalous_post", score=3.0, message_id=f"<reply{i}>",
                          reason="reply-all to an anomalous post"))
        if i % unfreeze_every == 0:
            out.append(Action(kind="unfreeze", list=lst, sender=None, event_time=t + i + 600, detector="operator",
                              score=0.0, message_id=None, reason="storm over", actor="ops"))
    return out


@pytest.mark.live
@pytest.mark.both_brokers
def test_receivers_down_during_a_storm_get_every_action_once_back(broker, start_deliver):
    """One webhook and Grafana down for the storm, another webhook up: nothing lost, nothing blocked."""
    create_topic(broker.bootstrap, ACTIONS_TOPIC, partitions=2)
    first = storm_actions(range(0, 30), T0)
    produce_actions(broker.bootstrap, first)

    up = WebhookReceiver(SECRET).start()
    down = WebhookReceiver(SECRET)  # its port is reserved in the config, nothing listens yet
    grafana = FakeGrafana(token="glsa_test")
    deliver = start_deliver(broker.url, {
        "STORMGUARD_WEBHOOK_URLS": f"up={up.hook_url},down={down.hook_url}",
        "STORMGUARD_WEBHOOK_SECRET": SECRET,
        "GRAFANA_URL": grafana.url, "GRAFANA_TOKEN": "glsa_test"})
    try:
        deliver.wait_ready()
        # The live receiver gets the whole storm while the other one and Grafana are down.
        assert up.wait_for(lambda: len(up.by_id) == len(first), 60), (len(up.by_id), deliver.log())
        assert deliver.metric("stormguard_outbox_backlog") > 0
        failures = deliver.metrics()
        assert re.search(r'stormguard_delivery_failures_total\{sink="webhook"\} [1-9]', failures), failures
        assert re.search(r'stormguard_delivery_failures_total\{sink="grafana"\} [1-9]', failures), failures

        # The storm goes on while they are down.
        second = storm_actions(range(30, 45), T0 + 100)
        produce_actions(broker.bootstrap, second)
        everything = first + second
        assert up.wait_for(lambda: len(up.by_id) == len(everything), 30)
        time.sleep(1.0)

        down.start()
        grafana.start()
        assert down.wait_for(lambda: len(down.by_id) == len(everything), 60), (len(down.by_id), deliver.log())
        want = {a.action_id for a in everything}
        assert set(down.by_id) == want and set(up.by_id) == want
        assert down.rejected == 0 and up.rejected == 0

        # Per list, in order: the unfreeze never overtakes its freeze.
        for rx in (up, down):
            seen = {}
            for msg_id in rx.order:
                body = rx.by_id[msg_id]
                lst = body["alerts"][0]["labels"]["list"]
                seen.setdefault(lst, []).append(body["alerts"][0]["annotations"]["action"])
            for kinds in seen.values():
                assert kinds in (["alert", "freeze"], ["alert", "freeze", "unfreeze"]), kinds

        # Grafana: one region per frozen list, closed where the list was released.
        frozen = {a.list for a in everything if a.kind == "freeze"}
        released = {a.list for a in everything if a.kind == "unfreeze"}
        # Retries are spread by backoff with jitter: wait for every region, not only the closed ones.
        assert grafana.wait_for(lambda: sum(1 for a in grafana.annotations.values() if a["timeEnd"] > a["time"])
                                == len(released) and len(grafana.annotations) >= len(frozen), 90), deliver.log()
        by_list = {a["tags"][2]: a for a in grafana.annotations.values()}
        assert set(by_list) == frozen and len(grafana.annotations) == len(frozen)
        assert {lst for lst, a in by_list.items() if a["timeEnd"] > a["time"]} == released

        deadline = time.monotonic() + 10
        while deliver.metric("stormguard_outbox_backlog") != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert deliver.metric("stormguard_outbox_backlog") == 0
        assert deliver.stop() == 0

        # Offsets were committed after delivery: a restart redelivers nothing.
        dups = (up.duplicates, down.duplicates, len(grafana.requests))
        again = start_deliver(broker.url, deliver.env)
        again.wait_ready()
        time.sleep(2.0)
        assert (up.duplicates, down.duplicates, len(grafana.requests)) == dups
        assert again.stop() == 0
    finally:
        for server in (up, down, grafana):
            server.stop()


@pytest.mark.live
@pytest.mark.both_brokers
async def test_rejected_and_undecodable_actions_are_dead_lettered_and_delivery_moves_on(broker, tmp_path):
    """A receiver that refuses a request for good does not wedge the outbox (in-process Deliverer)."""
    from stream_jobs.actions.deliver import ACTIONS_DLQ_TOPIC, DeliverSettings, Deliverer
    from stream_jobs.actions.sinks.http import HttpSink

    create_topic(broker.bootstrap, ACTIONS_TOPIC, partitions=1)
    actions = storm_actions(range(2), T0, unfreeze_every=1)
    produce_actions(broker.bootstrap, actions[:1], raw=[b"\xff not an action"])
    produce_actions(broker.bootstrap, actions[1:])

    with RecordingServer(status=422) as gw:
        sink = HttpSink(gw.url + "/lists/{list}/{kind}", kinds=["alert", "freeze", "unfreeze"], timeout=3)
        settings = DeliverSettings(broker=broker.url, backoff_base=0.05, backoff_max=0.2, max_rejects=2, web_port=0)
        deliverer = Deliverer([sink], settings)
        task = asyncio.create_task(deliverer.run())
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (len(gw.requests) < 2 * len(actions) or deliverer.runners[0].backlog):
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)
        finally:
            deliverer.stop.set()
            await asyncio.wait_for(task, 30)
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(None, lambda: read_topic(
            broker.bootstrap, ACTIONS_DLQ_TOPIC, timeout=30, until=lambda r: len(r) >= len(actions) + 1))
        dead = [json.loads(r.value) for r in records]
        assert len(dead) == len(actions) + 1
        reasons = [d["reason"] for d in dead]
        assert sum("undecodable" in r for r in reasons) == 1
        assert sum("HTTP 422" in r for r in reasons) == len(actions)
        kept = {json.loads(d["action"])["action_id"] for d in dead if d["encoding"] == "utf-8" and "422" in d["reason"]}
        assert kept == {a.action_id for a in actions}
        # Each refused action was tried max_rejects times, in order.
        assert len(gw.requests) == 2 * len(actions)
        assert [r["headers"]["idempotency-key"] for r in gw.requests[::2]] == [a.action_id for a in actions]
        assert not deliverer.crashed


@pytest.mark.live
@pytest.mark.both_brokers
def test_storm_to_mailman_grafana_and_webhook_end_to_end(broker, start_worker, start_deliver, tmp_path):
    """mail.events → worker → stormguard.actions → deliver → a real Mailman list frozen, then released by an
    operator; the same incident shows as a Grafana region and a firing-then-resolved Alertmanager alert."""
    from tests.conftest import produce_lines
    from tests.scenarios import T0 as S0, background, lines, nhsmail_storm
    from tests.stream_jobs.receivers import MailmanCore

    address = "all@nhs.example"
    core = MailmanCore(ROOT, tmp_path)
    core.install()
    core.start()
    rx = WebhookReceiver(SECRET).start()
    grafana = FakeGrafana(token="glsa_e2e").start()
    try:
        client = core.client()
        client.create_domain("nhs.example").create_list("all")
        assert client.get_list(address).settings["emergency"] is False

        worker = start_worker(broker.url, env={"STORMGUARD_ADMIN_TOKEN": "e2e-admin-token"})
        deliver = start_deliver(broker.url, {
            "STORMGUARD_WEBHOOK_URLS": rx.hook_url, "STORMGUARD_WEBHOOK_SECRET": SECRET,
            "GRAFANA_URL": grafana.url, "GRAFANA_TOKEN": "glsa_e2e", "GRAFANA_DASHBOARD_UID": "stormguard",
            "STORMGUARD_MAILMAN_URL": core.url, "STORMGUARD_MAILMAN_USER": core.user,
            "STORMGUARD_MAILMAN_PASSWORD": core.password})
        produce_lines(broker.bootstrap, lines(background() + nhsmail_storm(S0 + 3000, lst=address)))

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not core.client().get_list(address).settings["emergency"]:
            time.sleep(0.3)
        assert core.client().get_list(address).settings["emergency"] is True, deliver.log()

        def firing():
            return [b for b in rx.by_id.values() if b["status"] == "firing"
                    and b["alerts"][0]["labels"].get("list") == address
                    and b["alerts"][0]["annotations"]["action"] == "freeze"]

        assert rx.wait_for(lambda: firing(), 30)
        assert grafana.wait_for(lambda: len(grafana.annotations) == 1, 30)

        code, body = http_json(worker.url + f"/api/lists/{address}/unfreeze", "POST",
                               {"actor": "duty-manager", "reason": "storm over"}, token="e2e-admin-token")
        assert code == 200, body
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and core.client().get_list(address).settings["emergency"]:
            time.sleep(0.3)
        assert core.client().get_list(address).settings["emergency"] is False, deliver.log()

        assert rx.wait_for(lambda: any(b["status"] == "resolved" for b in rx.by_id.values()), 30)
        resolved = [b for b in rx.by_id.values() if b["status"] == "resolved"]
        assert len(resolved) == 1
        assert resolved[0]["alerts"][0]["fingerprint"] == firing()[0]["alerts"][0]["fingerprint"]
        assert resolved[0]["alerts"][0]["annotations"]["actor"] == "duty-manager"
        assert grafana.wait_for(lambda: all(a["timeEnd"] > a["time"] for a in grafana.annotations.values()), 30)
        (ann,) = grafana.annotations.values()
        assert ann["tags"] == ["stormguard", "freeze", address] and ann["dashboardUID"] == "stormguard"
        assert rx.rejected == 0 and grafana.unauthorized == 0
    finally:
        rx.stop()
        grafana.stop()
        core.stop()
