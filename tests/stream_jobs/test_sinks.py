"""Each sink against a real receiver on loopback (issue 4)."""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timezone

import aiohttp
import pytest

from detectors.policy import Action
from stream_jobs.settings import SettingsError
from stream_jobs.actions.sinks import Rejected, SinkError, Skip, sinks_from_env
from stream_jobs.actions.sinks.webhook import WebhookSink, alertmanager_payload, fingerprint
from stream_jobs.actions.sinks.grafana import GrafanaSink
from stream_jobs.actions.sinks.http import HttpSink
from tests.stream_jobs.receivers import FakeGrafana, RecordingServer, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"stormguard-test-secret-32-bytes!").decode()
T0 = 1479376800.0  # 2016-11-17T10:00:00Z, the morning of the NHSmail storm

# The Alertmanager webhook payload, version 4, as documented for webhook_config.
ALERTMANAGER_V4_SCHEMA = {
    "type": "object",
    "required": ["version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels", "commonLabels",
                 "commonAnnotations", "externalURL", "alerts"],
    "properties": {
        "version": {"const": "4"},
        "groupKey": {"type": "string"},
        "truncatedAlerts": {"type": "integer", "minimum": 0},
        "status": {"enum": ["firing", "resolved"]},
        "receiver": {"type": "string"},
        "groupLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "commonLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "commonAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "externalURL": {"type": "string"},
        "alerts": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "required": ["status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"],
                "properties": {
                    "status": {"enum": ["firing", "resolved"]},
                    "labels": {"type": "object", "required": ["alertname", "severity"],
                               "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "required": ["summary", "description"],
                                    "additionalProperties": {"type": "string"}},
                    "startsAt": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"},
                    "endsAt": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"},
                    "generatorURL": {"type": "string"},
                    "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                },
            },
        },
    },
}


def action(kind: str, lst: str | None = "all-staff@nhs.net", t: float = T0, detector: str = "reply_velocity",
           sender: str | None = "nurse@nhs.net", **kw) -> Action:
    return Action(kind=kind, list=lst, sender=sender, event_time=t, detector=detector, score=kw.pop("score", 12.5),
                  message_id=kw.pop("message_id", f"<{kind}-{t}@nhs.net>"), reason=kw.pop("reason", f"{kind} reason"),
                  **kw)


def test_alertmanager_v4_body_freeze_unfreeze_and_fanout():
    jsonschema = pytest.importorskip("jsonschema")
    freeze = action("freeze")
    unfreeze = action("unfreeze", t=T0 + 3600, detector="operator", sender=None, actor="ops@nhs.net")
    fanout = action("alert", lst=None, detector="fanout", sender="test@nhs.net")

    f = alertmanager_payload(freeze)
    u = alertmanager_payload(unfreeze, starts_at=freeze.event_time)
    a = alertmanager_payload(fanout)
    for body in (f, u, a):
        jsonschema.validate(body, ALERTMANAGER_V4_SCHEMA)
        json.dumps(body)  # plain JSON

    assert (f["status"], u["status"], a["status"]) == ("firing", "resolved", "firing")
    assert f["alerts"][0]["labels"] == {"alertname": "ReplyAllStorm", "list": "all-staff@nhs.net",
                                        "sender": "nurse@nhs.net", "severity": "critical"}
    assert a["alerts"][0]["labels"] == {"alertname": "FanoutAnomaly", "sender": "test@nhs.net", "severity": "warning"}
    # One incident, one fingerprint: the unfreeze resolves the freeze's alert.
    assert f["alerts"][0]["fingerprint"] == u["alerts"][0]["fingerprint"] == fingerprint(freeze)
    assert a["alerts"][0]["fingerprint"] != f["alerts"][0]["fingerprint"]
    assert f["groupKey"] == u["groupKey"]
    assert f["alerts"][0]["startsAt"] == "2016-11-17T10:00:00.000Z"
    assert f["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    assert u["alerts"][0]["startsAt"] == "2016-11-17T10:00:00.000Z"
    assert u["alerts"][0]["endsAt"] == "2016-11-17T11:00:00.000Z"
    assert "all-staff@nhs.net" in f["alerts"][0]["annotations"]["summary"]
    assert f["alerts"][0]["annotations"]["description"].startswith("freeze reason")
    assert u["alerts"][0]["annotations"]["actor"] == "ops@nhs.net"
    # Another list storming is another incident.
    assert fingerprint(action("freeze", lst="other@nhs.net")) != fingerprint(freeze)


async def test_webhook_verifies_with_standardwebhooks_and_carries_action_id():
    with WebhookReceiver(SECRET) as rx:
        sink = WebhookSink(rx.hook_url, SECRET, timeout=5)
        freeze, unfreeze = action("freeze"), action("unfreeze", t=T0 + 60, detector="cooldown")
        try:
            await sink.deliver(freeze)
            await sink.deliver(unfreeze)
            await sink.deliver(freeze)  # a redelivery from the at-least-once outbox
        finally:
            await sink.close()
        assert rx.wait_for(lambda: len(rx.by_id) == 2, 5)
        assert rx.order == [freeze.action_id, unfreeze.action_id]
        assert rx.duplicates == 1 and rx.rejected == 0
        body = rx.by_id[freeze.action_id]
        assert body["version"] == "4" and body["status"] == "firing"
        assert rx.by_id[unfreeze.action_id]["status"] == "resolved"
        # startsAt of the resolved alert is the freeze this sink delivered.
        assert rx.by_id[unfreeze.action_id]["alerts"][0]["startsAt"] == "2016-11-17T10:00:00.000Z"
        headers = rx.headers[freeze.action_id]
        assert headers["webhook-signature"].startswith("v1,")
        assert abs(int(headers["webhook-timestamp"]) - datetime.now(timezone.utc).timestamp()) < 60

        # The receiver really verifies: a body signed with another secret is refused.
        other = WebhookSink(rx.hook_url, "whsec_" + base64.b64encode(b"x" * 32).decode(), timeout=5)
        try:
            with pytest.raises(SinkError, match="HTTP 401"):
                await other.deliver(action("alert"))
        finally:
            await other.close()
        assert rx.rejected == 1


async def test_webhook_status_classes():
    with RecordingServer(status=503) as busy, RecordingServer(status=400) as bad:
        for url, exc in ((busy.url + "/h", SinkError), (bad.url + "/h", Rejected)):
            sink = WebhookSink(url, SECRET, timeout=5)
            try:
                with pytest.raises(exc):
                    await sink.deliver(action("freeze"))
            finally:
                await sink.close()
    # Nothing listens: a transient failure (retried), never a crash.
    sink = WebhookSink(f"http://127.0.0.1:{__import__('stream_jobs.kafka.broker').kafka.broker.free_port()}/h", SECRET, timeout=2)
    try:
        with pytest.raises(aiohttp.ClientError):
            await sink.deliver(action("freeze"))
    finally:
        await sink.close()


async def test_grafana_annotation_created_then_closed():
    with FakeGrafana(token="glsa_test") as grafana:
        sink = GrafanaSink(grafana.url, "glsa_test", dashboard_uid="stormguard-overview", timeout=5)
        freeze = action("freeze", lst="all+staff@nhs.net")
        unfreeze = action("unfreeze", lst="all+staff@nhs.net", t=T0 + 1800, detector="operator", sender=None,
                          actor="ops")
        try:
            assert not sink.accepts(action("alert"))
            await sink.deliver(freeze)
            await sink.deliver(freeze)  # redelivered: still one annotation
            assert len(grafana.annotations) == 1
            (ann,) = grafana.annotations.values()
            assert ann["time"] == ann["timeEnd"] == int(T0 * 1000)
            assert ann["tags"] == ["stormguard", "freeze", "all+staff@nhs.net"]
            assert ann["dashboardUID"] == "stormguard-overview"
            assert "all+staff@nhs.net" in ann["text"]

            await sink.deliver(unfreeze)
            assert ann["timeEnd"] == int((T0 + 1800) * 1000), "the freeze is now a region"
            assert ann["tags"] == ["stormguard", "freeze", "all+staff@nhs.net"], "PATCH must keep the tags"
            assert ("PATCH", f"/api/annotations/{ann['id']}") in grafana.requests
            with pytest.raises(Skip):
                await sink.deliver(unfreeze)  # nothing open any more

            # A second storm on the same list is a second region.
            await sink.deliver(action("freeze", lst="all+staff@nhs.net", t=T0 + 7200))
            assert len(grafana.annotations) == 2
        finally:
            await sink.close()
        assert grafana.unauthorized == 0

        wrong = GrafanaSink(grafana.url, "not-the-token", timeout=5)
        try:
            with pytest.raises(SinkError, match="401"):
                await wrong.deliver(freeze)
        finally:
            await wrong.close()


async def test_grafana_down_is_transient():
    from stream_jobs.kafka.broker import free_port

    sink = GrafanaSink(f"http://127.0.0.1:{free_port()}", "t", timeout=2)
    try:
        with pytest.raises(Exception) as info:
            await sink.deliver(action("freeze"))
        assert not isinstance(info.value, (Rejected, Skip))
    finally:
        await sink.close()


async def test_http_sink_templates():
    with RecordingServer(status=202) as gw:
        sink = HttpSink(gw.url + "/lists/{list}/{kind}", method="PUT",
                        body_template='{"list": "{list}", "frozen": "{frozen}", "why": "{actor}: {reason}", '
                                      '"score": "{score}"}',
                        token="gw-token", timeout=5)
        try:
            assert sink.accepts(action("freeze")) and not sink.accepts(action("alert"))
            a = action("freeze", lst="all staff@nhs.net")
            await sink.deliver(a)
        finally:
            await sink.close()
        (req,) = gw.requests
        assert req["method"] == "PUT"
        assert req["path"] == "/lists/all%20staff@nhs.net/freeze"
        assert req["body"] == {"list": "all staff@nhs.net", "frozen": True, "why": "stormguard: freeze reason",
                               "score": 12.5}
        assert req["headers"]["authorization"] == "Bearer gw-token"
        assert req["headers"]["idempotency-key"] == a.action_id


def test_sinks_from_env_and_secrets_never_echoed(tmp_path):
    secret_file = tmp_path / "whsec"
    secret_file.write_text(SECRET + "\n")
    env = {"STORMGUARD_WEBHOOK_URLS": "http://127.0.0.1:1/a, pager=http://127.0.0.1:2/b?token=abc",
           "STORMGUARD_WEBHOOK_SECRET_FILE": str(secret_file),
           "GRAFANA_URL": "http://127.0.0.1:3000", "GRAFANA_TOKEN": "glsa_x",
           "STORMGUARD_MAILMAN_URL": "http://127.0.0.1:8001", "STORMGUARD_MAILMAN_PASSWORD": "pw",
           "STORMGUARD_HTTP_URL": "http://gw/{list}"}
    sinks = sinks_from_env(env)
    assert [s.kind for s in sinks] == ["webhook", "webhook", "grafana", "mailman", "http"]
    assert sinks[1].name == "webhook-pager"
    assert "abc" not in sinks[0].name + sinks[1].name and sinks[0].name.startswith("webhook-")

    with pytest.raises(SettingsError, match="STORMGUARD_WEBHOOK_SECRET"):
        sinks_from_env({"STORMGUARD_WEBHOOK_URLS": "http://127.0.0.1:1/a"})
    with pytest.raises(SettingsError) as info:
        sinks_from_env({"STORMGUARD_WEBHOOK_URLS": "http://127.0.0.1:1/a", "STORMGUARD_WEBHOOK_SECRET": "whsec_%%%!"})
    assert "%%%" not in str(info.value)
    with pytest.raises(SettingsError, match="placeholder"):
        sinks_from_env({"STORMGUARD_HTTP_URL": "http://gw/{nope}"})
    assert sinks_from_env({}) == []


@pytest.mark.live
async def test_mailman_list_emergency_moderation_set_and_released(tmp_path):
    """Against a real Mailman 3 core (SQLite) that this test installs (once) and starts."""
    from pathlib import Path

    from stream_jobs.actions.sinks.mailman import MailmanSink
    from tests.stream_jobs.receivers import MailmanCore

    root = Path(__file__).resolve().parents[2]
    core = MailmanCore(root, tmp_path)
    core.install()
    core.start()
    try:
        client = core.client()
        client.create_domain("nhs.example")
        client.get_domain("nhs.example").create_list("all-staff")
        address = "all-staff@nhs.example"
        assert client.get_list(address).settings["emergency"] is False

        sink = MailmanSink(core.url, core.user, core.password, timeout=10)
        await sink.deliver(action("freeze", lst=address))
        assert core.client().get_list(address).settings["emergency"] is True
        await sink.deliver(action("freeze", lst=address))  # redelivery: idempotent
        assert core.client().get_list(address).settings["emergency"] is True

        await sink.deliver(action("unfreeze", lst=address, t=T0 + 60, detector="operator", sender=None))
        assert core.client().get_list(address).settings["emergency"] is False

        with pytest.raises(Skip):  # not a Mailman list: someone else's
            await sink.deliver(action("freeze", lst="exchange-dl@nhs.example"))
        wrong = MailmanSink(core.url, core.user, "wrong-password", timeout=10)
        with pytest.raises(SinkError, match="401"):
            await wrong.deliver(action("freeze", lst=address))
    finally:
        core.stop()
    # Mailman down: transient, retried from the outbox.
    with pytest.raises(SinkError):
        await sink.deliver(action("freeze", lst=address))
    assert os.path.exists(core.cfg)


async def test_shadow_mode_decisions_hold_nothing_and_say_would_freeze(tmp_path):
    """STORMGUARD_ENFORCE=false: Mailman and the HTTP sink do nothing; webhooks and Grafana say "would"."""
    from detectors.policy import shadow
    from stream_jobs.actions.sinks.mailman import MailmanSink

    freeze, unfreeze = shadow(action("freeze")), shadow(action("unfreeze", t=T0 + 60))
    assert not HttpSink("http://127.0.0.1:1/{list}").accepts(freeze)
    assert HttpSink("http://127.0.0.1:1/{list}").accepts(action("freeze"))
    mailman = MailmanSink("http://127.0.0.1:1", "restadmin", "x")
    assert not mailman.accepts(freeze) and not mailman.accepts(unfreeze) and mailman.accepts(action("freeze"))

    body = alertmanager_payload(freeze)
    (alert,) = body["alerts"]
    assert "would freeze" in alert["annotations"]["summary"] and alert["annotations"]["enforced"] == "false"
    assert alertmanager_payload(action("freeze"))["alerts"][0]["annotations"]["enforced"] == "true"

    with FakeGrafana(token="glsa_test") as grafana:
        sink = GrafanaSink(grafana.url, "glsa_test", timeout=5)
        try:
            await sink.deliver(freeze)
            await sink.deliver(action("freeze", t=T0 + 10))  # an operator's real freeze is its own region
            shadowed = [a for a in grafana.annotations.values() if "would-freeze" in a["tags"]]
            assert len(shadowed) == 1 and "would freeze" in shadowed[0]["text"]
            await sink.deliver(unfreeze)
            assert shadowed[0]["timeEnd"] == int((T0 + 60) * 1000)
            real = [a for a in grafana.annotations.values() if "freeze" in a["tags"]]
            assert len(real) == 1 and real[0]["timeEnd"] == real[0]["time"], "the real freeze is still open"
        finally:
            await sink.close()


# -- Alertmanager (the live cases against the real binary are in test_alertmanager_live.py) -----------------
async def test_alertmanager_ha_set_needs_one_taker_and_classifies_refusals():
    from stream_jobs.actions.sinks.alertmanager import AlertmanagerSink

    with RecordingServer(status=200) as up, RecordingServer(status=503) as busy, RecordingServer(status=400) as bad:
        for urls, outcome in (([up.url, busy.url], None), ([busy.url, bad.url], SinkError), ([bad.url], Rejected)):
            sink = AlertmanagerSink(urls, timeout=5, resend_interval=3600, bearer_token="tok")
            try:
                if outcome is None:
                    await sink.deliver(action("freeze"))
                else:
                    with pytest.raises(outcome):
                        await sink.deliver(action("freeze"))
            finally:
                await sink.close()
        (req,) = [r for r in up.requests if r["method"] == "POST"]
        assert req["path"] == "/api/v2/alerts" and req["headers"]["authorization"] == "Bearer tok"
        (alert,) = req["body"]
        assert alert["labels"] == {"alertname": "ReplyAllStorm", "list": "all-staff@nhs.net", "severity": "critical",
                                   "detector": "reply_velocity", "enforced": "true", "app_id": "stormguard"}
        assert alert["startsAt"] == "2016-11-17T10:00:00.000Z" and alert["endsAt"] > alert["startsAt"]
        assert busy.requests, "every Alertmanager of the set is tried"


async def test_alertmanager_unfreeze_resolves_the_freeze_s_labels_and_skips_the_unknown():
    from stream_jobs.actions.sinks.alertmanager import AlertmanagerSink

    with RecordingServer(status=200) as am:
        sink = AlertmanagerSink([am.url], timeout=5, resend_interval=3600)
        try:
            await sink.deliver(action("alert", detector="fanout", sender="test@nhs.net"))
            await sink.deliver(action("freeze"))
            assert len(sink.firing()) == 1  # the freeze is kept alive; the warning has its own endsAt
            await sink.deliver(action("unfreeze", t=T0 + 60, detector="cooldown", sender=None))
            await sink.deliver(action("unfreeze", t=T0 + 60, detector="cooldown", sender=None))  # redelivered
            assert sink.firing() == []
        finally:
            await sink.close()
        posts = [r["body"] for r in am.requests if r["method"] == "POST"]
        resolved = posts[2]
        assert posts[3] == resolved  # the redelivery resolves the same alerts again
        assert {a["labels"]["detector"] for a in resolved} == {"reply_velocity", "fanout"}  # the freeze's, not "cooldown"
        assert all(a["endsAt"] == "2016-11-17T10:01:00.000Z" for a in resolved)
        assert "released" in resolved[0]["annotations"]["summary"]
    # An unfreeze of a list this sink never saw, and no Alertmanager knows: nothing to resolve.
    with RecordingServer(status=200) as empty:
        sink = AlertmanagerSink([empty.url], timeout=5, resend_interval=3600)
        try:
            with pytest.raises(Skip):
                await sink.deliver(action("unfreeze", lst="other@nhs.net", t=T0 + 60, detector="operator"))
        finally:
            await sink.close()


def test_alertmanager_recovers_firing_freezes_and_marks_shadow_and_capped_ones():
    from detectors.policy import shadow
    from stream_jobs.actions.sinks.alertmanager import AlertmanagerSink, labels_of, annotations_of

    sink = AlertmanagerSink(["http://127.0.0.1:1"])
    sink.recover([action("freeze", lst="a@x"), action("freeze", lst="b@x"), action("unfreeze", lst="a@x", t=T0 + 9),
                  shadow(action("freeze", lst="c@x")), action("alert", lst="d@x")])
    assert sorted(a.labels["list"] for a in sink.firing()) == ["b@x", "c@x"]
    would = labels_of(shadow(action("freeze")), "sg")
    assert would["severity"] == "info" and would["enforced"] == "false"
    assert "would freeze" in annotations_of(shadow(action("freeze")))["summary"]
    capped = action("alert", reason="3 reply-alls; not frozen: 20 freezes in the last hour (max_freezes_per_hour), "
                                    "an operator must confirm")
    assert labels_of(capped, "sg")["severity"] == "critical"
    assert "NOT frozen" in annotations_of(capped)["summary"]
    assert labels_of(action("alert"), "sg")["severity"] == "warning"


def test_alertmanager_settings(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    (sink,) = sinks_from_env({"STORMGUARD_ALERTMANAGER_URLS": "http://am1:9093, http://am2:9093/api/v2/alerts",
                              "STORMGUARD_ALERTMANAGER_USERNAME": "stormguard",
                              "STORMGUARD_ALERTMANAGER_PASSWORD_FILE": str(pw), "STORMGUARD_APP_ID": "sg-eu",
                              "STORMGUARD_ALERTMANAGER_RESEND_INTERVAL": "30"})
    assert sink.kind == "alertmanager" and sink.urls == ["http://am1:9093", "http://am2:9093"]
    assert sink._auth == ("stormguard", "s3cret") and sink.app_id == "sg-eu" and sink.resend_interval == 30
    for env, match in (({"STORMGUARD_ALERTMANAGER_URLS": "am1:9093"}, "http"),
                       ({"STORMGUARD_ALERTMANAGER_URLS": "http://a", "STORMGUARD_ALERTMANAGER_USERNAME": "u"}, "together"),
                       ({"STORMGUARD_ALERTMANAGER_URLS": "http://a", "STORMGUARD_ALERTMANAGER_BEARER_TOKEN": "t",
                         "STORMGUARD_ALERTMANAGER_USERNAME": "u", "STORMGUARD_ALERTMANAGER_PASSWORD": "p"}, "exclude"),
                       ({"STORMGUARD_ALERTMANAGER_URLS": "http://a,http://a/"}, "twice"),
                       ({"STORMGUARD_ALERTMANAGER_URLS": "http://a", "STORMGUARD_ALERTMANAGER_CA_FILE": "/nope"},
                        "cannot load"),
                       ({"STORMGUARD_ALERTMANAGER_URLS": "http://a", "STORMGUARD_ALERTMANAGER_RESEND_INTERVAL": "0"},
                        "> 0")):
        with pytest.raises(SettingsError, match=match):
            sinks_from_env(env)


@pytest.mark.live
async def test_alertmanager_over_tls_with_basic_auth(tmp_path):
    """The real Alertmanager behind its own TLS and basic auth (--web.config.file); secrets from files."""
    import bcrypt  # Alertmanager's web config wants bcrypt hashes
    import secrets
    import shutil
    import subprocess

    from tests.stream_jobs.receivers import Alertmanager, alertmanager_config

    cert, key = tmp_path / "am.crt", tmp_path / "am.key"
    subprocess.run([shutil.which("openssl") or "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    password = secrets.token_urlsafe(12)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
    web = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  stormguard: '{hashed}'\n"
    pw = tmp_path / "am-password"
    pw.write_text(password + "\n")
    with Alertmanager(tmp_path, alertmanager_config("http://127.0.0.1:9/none"), web_config=web, scheme="https") as am:
        env = {"STORMGUARD_ALERTMANAGER_URLS": am.url, "STORMGUARD_ALERTMANAGER_USERNAME": "stormguard",
               "STORMGUARD_ALERTMANAGER_PASSWORD_FILE": str(pw), "STORMGUARD_ALERTMANAGER_CA_FILE": str(cert)}
        (sink,) = sinks_from_env(env)
        try:
            await sink.deliver(action("freeze", lst="tls@nhs.example"))
            sink.active.clear()
            found = await sink._ask_alertmanager(action("unfreeze", lst="tls@nhs.example"))
            assert [a.labels["list"] for a in found] == ["tls@nhs.example"]
        finally:
            await sink.close()
        (wrong,) = sinks_from_env({**env, "STORMGUARD_ALERTMANAGER_PASSWORD_FILE": "",
                                   "STORMGUARD_ALERTMANAGER_PASSWORD": "not-it"})
        untrusted = sinks_from_env({**env, "STORMGUARD_ALERTMANAGER_CA_FILE": ""})[0]
        for other, text in ((wrong, "401"), (untrusted, "no Alertmanager took")):
            try:
                with pytest.raises(SinkError, match=text):  # transient: an operator fixes it, the outbox retries
                    await other.deliver(action("freeze", lst="tls@nhs.example"))
            finally:
                await other.close()
