"""``stormguard deliver`` into a real Prometheus Alertmanager (Debian's 0.25), and on to a webhook receiver.

No mocks: the embedded broker, real ``stormguard run`` / ``stormguard deliver``
processes, the real ``prometheus-alertmanager`` binary on loopback ports, and an
aiohttp receiver standing in for the on-call's chat or pager bridge.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from detectors.policy import Action, shadow
from stream_jobs.settings import ACTIONS_TOPIC
from tests.conftest import http_json, wait_for
from tests.stream_jobs.receivers import Alertmanager, RecordingServer, alertmanager_config, example_alertmanager_config
# start_deliver is test_deliver's fixture (deliver processes stopped after each test), used here as it is
from tests.stream_jobs.test_deliver import create_topic, produce_actions, start_deliver  # noqa: F401

pytestmark = pytest.mark.live


def notifications(rx: RecordingServer, path: str = "/notify") -> list[dict]:
    with rx.lock:
        return [r["body"] for r in rx.requests if r["method"] == "POST" and r["path"] == path]


def about(rx: RecordingServer, address: str, status: str, path: str = "/notify") -> list[dict]:
    return [n for n in notifications(rx, path) if n["groupLabels"].get("list") == address and n["status"] == status]


def test_a_storm_reaches_on_call_as_one_notification_and_the_unfreeze_resolves_it(broker, start_worker,
                                                                                   start_deliver, tmp_path):
    """mail.events → worker → stormguard.actions → deliver → the route of deploy/alertmanager/alertmanager.yml →
    the on-call's webhook."""
    from tests.conftest import produce_lines
    from tests.scenarios import background, lines, nhsmail_storm

    address = "all@nhs.example"
    with RecordingServer(status=200) as rx, \
            Alertmanager(tmp_path, example_alertmanager_config(rx.url + "/notify")) as am:
        worker = start_worker(broker.url, env={"STORMGUARD_ADMIN_TOKEN": "am-admin-token"})
        deliver = start_deliver(broker.url, {
            "STORMGUARD_ALERTMANAGER_URLS": am.url,
            "STORMGUARD_ALERTMANAGER_RUNBOOK_URL": "https://wiki.nhs.example/runbooks/reply-all-storm?list={list}",
            "STORMGUARD_EXTERNAL_URL": "https://grafana.nhs.example/d/stormguard-list?var-list={list}",
            "STORMGUARD_APP_ID": "stormguard"})
        # The storm now, in real time: the test message, then seconds later the reply-alls (Alertmanager
        # notifies at once a new group whose first alert started more than group_wait ago).
        now = time.time()
        root, *replies = nhsmail_storm(now, lst=address)
        produce_lines(broker.bootstrap, lines(background(start=now - 1800) + [root]))
        time.sleep(3)
        for j, reply in enumerate(replies):
            reply["timestamp"] = time.time() + 0.2 * j
        produce_lines(broker.bootstrap, lines(replies))

        firing = wait_for(lambda: about(rx, address, "firing"), 90, "a firing notification", 0.3)
        time.sleep(8)  # over twice group_interval (3 s): any change to this storm's group would be notified by now
        firing = about(rx, address, "firing")
        assert len(firing) == 1, deliver.log() + json.dumps([[(a["labels"]["alertname"], a["startsAt"]) for a in n["alerts"]] for n in firing])
        (note,) = firing
        assert note["receiver"] == "mail-on-call" and note["version"] == "4"
        names = sorted(a["labels"]["alertname"] for a in note["alerts"])
        # The test message's fan-out warning and the freeze at the first reply-all: one storm, one notification,
        # not one per reply-all (8 reply-alls were sent).
        assert names == ["FanoutAnomaly", "ReplyAllStorm"], note["alerts"]
        freeze = next(a for a in note["alerts"] if a["labels"]["alertname"] == "ReplyAllStorm")
        assert freeze["labels"] == {"alertname": "ReplyAllStorm", "list": address, "severity": "critical",
                                    "detector": "reply_to_anomalous_post", "enforced": "true",
                                    "app_id": "stormguard"}
        assert "list frozen" in freeze["annotations"]["summary"]
        assert freeze["annotations"]["runbook_url"] == \
            "https://wiki.nhs.example/runbooks/reply-all-storm?list=all%40nhs.example"
        assert freeze["generatorURL"].endswith("var-list=all%40nhs.example")
        assert freeze["status"] == "firing"
        sample = {"firing": note}

        code, body = http_json(worker.url + f"/api/lists/{address}/unfreeze", "POST",
                               {"actor": "duty-manager", "reason": "storm over, list checked"},
                               token="am-admin-token")
        assert code == 200, body
        resolved = wait_for(lambda: about(rx, address, "resolved"), 60, "the resolved notification", 0.3)
        (done,) = resolved
        assert {a["labels"]["alertname"] for a in done["alerts"]} == {"FanoutAnomaly", "ReplyAllStorm"}
        res = next(a for a in done["alerts"] if a["labels"]["alertname"] == "ReplyAllStorm")
        assert res["status"] == "resolved" and res["labels"] == freeze["labels"]
        assert res["fingerprint"] == freeze["fingerprint"]
        assert "duty-manager" in res["annotations"]["resolution"]
        assert am.alerts(list=address) == [] or all(a["status"]["state"] != "active" for a in am.alerts(list=address))
        sample["resolved"] = done
        out = os.environ.get("STORMGUARD_ALERTMANAGER_SAMPLE")
        if out:  # the body docs/actions.md shows: `STORMGUARD_ALERTMANAGER_SAMPLE=FILE pytest …`
            with open(out, "w") as fh:
                json.dump(sample, fh, indent=2)
        assert deliver.metric("stormguard_outbox_backlog") == 0
        assert "no Alertmanager took" not in deliver.log()


def _freeze(address: str, t: float, detector: str = "reply_velocity") -> Action:
    return Action(kind="freeze", list=address, sender="staff1@nhs.example", event_time=t, detector=detector,
                  score=4.0, message_id=f"<{address}-r3>", reason="3 reply-alls to a bulletin")


def _unfreeze(address: str, t: float) -> Action:
    return Action(kind="unfreeze", list=address, sender=None, event_time=t, detector="cooldown", score=0.0,
                  message_id=None, reason="no storm post for 6 h")


def test_silences_ha_pair_resends_and_a_restart_keep_alerts_true(broker, start_deliver, tmp_path):
    """Two Alertmanagers (an HA pair), a silence made through the API, shadow mode, re-sends, a restart."""
    create_topic(broker.bootstrap, ACTIONS_TOPIC, partitions=2)
    quiet, loud, trial = "planned-migration@nhs.example", "all-staff@nhs.example", "new-list@nhs.example"
    with RecordingServer(status=200) as rx, \
            Alertmanager(tmp_path, alertmanager_config(rx.url + "/am1"), name="am1") as am1, \
            Alertmanager(tmp_path, alertmanager_config(rx.url + "/am2"), name="am2") as am2:
        for am in (am1, am2):  # silences are made per Alertmanager here (no gossip between these two)
            am.silence({"list": quiet}, comment="list migration tonight")
        env = {"STORMGUARD_ALERTMANAGER_URLS": f"{am1.url},{am2.url}/api/v2/alerts",
               "STORMGUARD_ALERTMANAGER_RESEND_INTERVAL": "1"}
        deliver = start_deliver(broker.url, env)
        now = time.time()
        produce_actions(broker.bootstrap, [_freeze(quiet, now - 60), _freeze(loud, now - 50),
                                           shadow(_freeze(trial, now - 40))])

        for path in ("/am1", "/am2"):  # each peer notifies (a cluster would deduplicate by gossip)
            wait_for(lambda: about(rx, loud, "firing", path) and about(rx, trial, "firing", path), 60,
                     f"notifications from {path}", 0.3)
        (trial_note,) = about(rx, trial, "firing", "/am1")
        (would,) = trial_note["alerts"]
        assert would["labels"]["severity"] == "info" and would["labels"]["enforced"] == "false"
        assert "would freeze" in would["annotations"]["summary"]

        # The silence made through Alertmanager's API stops the notification; the alert is there, suppressed.
        silenced = wait_for(lambda: am1.alerts(list=quiet), 10, "the silenced alert in Alertmanager")
        assert silenced[0]["status"]["state"] == "suppressed" and silenced[0]["status"]["silencedBy"]
        time.sleep(4)
        assert not [n for n in notifications(rx, "/am1") + notifications(rx, "/am2")
                    if n["groupLabels"].get("list") == quiet]

        # Re-sent while frozen: valid 4 intervals (4 s) from each post, yet still active 6 s later.
        (first,) = am1.alerts(list=loud)
        time.sleep(6)
        (later,) = am1.alerts(list=loud)
        assert later["status"]["state"] == "active" and later["endsAt"] > first["endsAt"]
        assert later["startsAt"] == first["startsAt"]

        # A restart: the firing freezes come back from stormguard.actions and are re-posted at once.
        assert deliver.stop() == 0
        restarted = time.time()
        again = start_deliver(broker.url, env)
        again.wait_ready()
        assert wait_for(lambda: "still firing" in again.log(), 30, "the recovery log line")

        def refreshed():
            alerts = am2.alerts(list=loud)
            return alerts and alerts[0]["status"]["state"] == "active" and \
                alerts[0]["updatedAt"] > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(restarted))

        wait_for(refreshed, 30, "the freeze re-posted after the restart", 0.3)

        # The unfreeze resolves the freeze it never delivered itself (the labels came from the history).
        produce_actions(broker.bootstrap, [_unfreeze(loud, time.time())])
        for path in ("/am1", "/am2"):
            (done,) = wait_for(lambda: about(rx, loud, "resolved", path), 60, f"resolved from {path}", 0.3)
            assert done["alerts"][0]["labels"]["detector"] == "reply_velocity"
        assert len(about(rx, loud, "firing", "/am1")) >= 1
