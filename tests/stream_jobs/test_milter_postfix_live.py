"""``stormguard milter`` in a real Postfix: the storm's thread is held before its first reply-all is delivered.

A private Postfix 3.7 on loopback (the fixture of ``test_postfix_e2e``) with ``smtpd_milters`` at
the milter and ``milter_default_action = accept``; a real broker and worker; mail sent with
smtplib. The milter produces every message's event itself (no maillog, no header_checks); after
the root post's thread hold arrives on ``stormguard.thread-watch``, its reply-alls land in the hold
queue (``postqueue -j``) while another thread of the list and other mail are delivered. The
unfreeze releases what is held outside the storm thread, the storm thread is released in bulk by
the admin API, and with the milter killed mail flows (fail open).
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from stream_jobs.kafka.broker import free_port
from tests.conftest import http_json, read_topic, wait_for
from tests.stream_jobs.test_postfix_e2e import LIST, MEMBERS, PostfixInstance, _Child, _port_open, _skip_reason

pytestmark = pytest.mark.live

TOKEN = "milter-test-token"


class MilterPostfix(PostfixInstance):
    """The e2e Postfix, with the milter instead of the policy server (docs/postfix.md, milter mode)."""

    def __init__(self, milter_port: int):
        super().__init__(policy_port=0)
        self.milter_port = milter_port

    def write_config(self) -> None:
        super().write_config()
        main = self.conf / "main.cf"
        lines = [line for line in main.read_text().splitlines()
                 if not line.startswith(("stormguard_policy", "smtpd_recipient_restrictions", "header_checks"))]
        lines += ["smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination",
                  f"smtpd_milters = inet:127.0.0.1:{self.milter_port}",
                  "non_smtpd_milters = $smtpd_milters",
                  "milter_default_action = accept",
                  "milter_connect_timeout = 5s"]
        main.write_text("\n".join(lines) + "\n")

    def held(self) -> dict[str, dict]:
        return {m["queue_id"]: m for m in self.queue() if m["queue_name"] == "hold"}


def _queue_id(mta, message_id: str) -> str:
    import re

    found = re.search(r"(\w+): message-id=" + re.escape(message_id), mta.log())
    assert found, f"no cleanup line for {message_id}"
    return found.group(1)


def _events(broker) -> dict[str, dict]:
    return {e["message_id"]: e for e in (json.loads(r.value) for r in read_topic(broker.bootstrap, "mail.events",
                                                                                timeout=3))}


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_milter_holds_the_storm_thread_before_its_first_reply_all(broker, start_worker, tmp_path):
    worker = start_worker(broker.url, env={"STORMGUARD_WARMUP_EVENTS": "0", "STORMGUARD_NEW_LIST_MIN_MEMBERS": "500",
                                           "STORMGUARD_ADMIN_TOKEN": TOKEN})
    milter_port, admin_port = free_port(), free_port()
    mta = MilterPostfix(milter_port)
    children: list[_Child] = []
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        mta.start()
        milter = _Child(["-v", "milter", "--listen", f"inet:127.0.0.1:{milter_port}", "--broker", broker.url,
                         "--lists", str(mta.virtual), "--state-dir", str(tmp_path / "milter"),
                         "--postfix-config", str(mta.conf), "--admin-listen", f"127.0.0.1:{admin_port}"],
                        tmp_path / "milter.log", env={"STORMGUARD_ADMIN_TOKEN": TOKEN})
        children.append(milter)
        wait_for(lambda: _port_open(milter_port) or not milter.alive(), 30, "the milter")
        assert milter.alive(), milter.log()

        # 1. the milter produces the events itself: ordinary mail, and a first post to a never-seen 600-member list
        mta.send("dave@example.test", ["x@members.example.test"], "lunch?", "<flow1@example.test>")
        mta.send("alice@example.test", [LIST], "Test message", "<root@example.test>")
        seen = wait_for(lambda: (ev := _events(broker)) and {"<flow1@example.test>", "<root@example.test>"} <= set(ev)
                        and ev, 60, f"the milter's events\n{milter.log()}")
        root = seen["<root@example.test>"]
        assert root["sender"] == "alice@example.test" and root["recipients"] == [LIST]
        assert root["lists"] == {LIST: MEMBERS} and root["subject"] == "Test message"

        # 2. the worker holds its thread (an anomalous post): the watch reaches the milter
        watch = wait_for(lambda: [json.loads(r.value) for r in read_topic(broker.bootstrap, "stormguard.thread-watch",
                                                                          timeout=2)], 60,
                         f"the thread hold on stormguard.thread-watch\n{worker.tail()}")
        assert watch[0]["list"] == LIST and watch[0]["root"] == "<root@example.test>" and watch[0]["until"]
        wait_for(lambda: http_json(admin + "/api/holds")[1]["threads"], 30, f"the milter to hold the thread\n"
                                                                            f"{milter.log()}")

        # 3. another post to the list flows; the first reply-all into the thread is held, not delivered
        mta.send("bob@example.test", [LIST], "Rota for December", "<rota@example.test>")
        mta.send("carol@example.test", [LIST, "alice@example.test"], "RE: Test message", "<reply1@example.test>",
                 in_reply_to="<root@example.test>")
        held = wait_for(lambda: mta.held(), 30, f"a message in the hold queue\n{mta.log()[-3000:]}\n{milter.log()}")
        (reply1,) = held.values()
        assert reply1["sender"] == "carol@example.test" and len(reply1["recipients"]) == MEMBERS + 1
        rota = _queue_id(mta, "<rota@example.test>")
        wait_for(lambda: f"{rota}: to=<user0@members.example.test>, orig_to=<{LIST}>" in mta.log(), 30,
                 "the delivery of the other thread's post to the list")
        assert f"{_queue_id(mta, '<reply1@example.test>')}: milter-hold: END-OF-MESSAGE" in mta.log()
        health = http_json(admin + "/healthz")[1]
        assert health["counts"]["held_thread"] == 1 and health["counts"]["errors"] == 0
        assert health["decide_ms"]["of"] >= 4 and health["decide_ms"]["p99"] > 0
        # the held reply is still an event: the worker freezes the list on it (reply-all to an anomalous post)
        status = wait_for(lambda: (s := worker.get(f"/api/lists/{LIST}"))["frozen"] and s, 60,
                          f"the freeze\n{worker.tail()}")
        assert "anomalous" in status["reason"]
        wait_for(lambda: LIST in http_json(admin + "/api/holds")[1]["frozen"], 30, "the milter to see the freeze")

        # 4. frozen: another reply into the thread, and a new post outside it, are held; other mail flows
        mta.send("erin@example.test", [LIST], "Re: Test message", "<reply2@example.test>",
                 in_reply_to="<reply1@example.test>")  # References: <reply1> only (a client that keeps one id)
        mta.send("frank@example.test", [LIST], "Canteen closed", "<canteen@example.test>")
        mta.send("gina@example.test", ["y@members.example.test"], "minutes", "<flow2@example.test>")
        held = wait_for(lambda: (h := mta.held()) and len(h) == 3 and h, 30, f"three held\n{milter.log()}")
        wait_for(lambda: "to=<y@members.example.test>" in mta.log(), 30, "the delivery of other mail")
        assert not [m for m in mta.queue() if m["queue_name"] != "hold"]
        by_sender = {m["sender"]: q for q, m in held.items()}
        assert set(by_sender) == {"carol@example.test", "erin@example.test", "frank@example.test"}

        # 5. the operator unfreezes the list: held mail outside the storm thread is released, the storm's stays held
        code, _ = http_json(worker.url + f"/api/lists/{LIST}/unfreeze", "POST", {"actor": "alice", "reason": "over"},
                            token=TOKEN)
        assert code == 200
        held = wait_for(lambda: (h := mta.held()) and len(h) == 2 and h, 30, f"the release\n{milter.log()}")
        assert {m["sender"] for m in held.values()} == {"carol@example.test", "erin@example.test"}
        assert f"{by_sender['frank@example.test']}: released from hold" in mta.log()

        # 6. the storm thread, released in bulk by the admin API (token-protected), as an action with actor and reason
        assert http_json(admin + "/api/holds/release", "POST", {"list": LIST})[0] == 401  # no token given
        code, _ = http_json(admin + "/api/holds/release", "POST", {"list": LIST, "thread": "<root@example.test>"},
                            token="wrong")
        assert code == 401
        code, result = http_json(admin + "/api/holds/release", "POST",
                                 {"list": LIST, "thread": "<root@example.test>", "actor": "moderator",
                                  "reason": "the replies were harmless"}, token=TOKEN)
        assert code == 200 and result["released"] == 2, result
        wait_for(lambda: not mta.held(), 30, "the bulk release")
        releases = wait_for(lambda: [a for a in (json.loads(r.value) for r in read_topic(
            broker.bootstrap, "stormguard.actions", timeout=2)) if a["kind"] == "release"], 30, "the release actions")
        assert {(a["actor"], a["list"]) for a in releases} == {("stormguard", LIST), ("moderator", LIST)}
        assert any("harmless" in a["reason"] and a["message_id"] == "<root@example.test>" for a in releases)

        # 7. fail open: with the milter killed, mail is accepted and delivered (milter_default_action = accept)
        os.kill(milter.proc.pid, signal.SIGKILL)
        milter.proc.wait(10)
        mta.send("henry@example.test", [LIST], "RE: Test message", "<reply3@example.test>",
                 in_reply_to="<root@example.test>")
        wait_for(lambda: "reply3@example.test" in mta.log() and "milter" in mta.log(), 30, "the unfiltered message")
        wait_for(lambda: not mta.queue(), 30, f"delivery without the milter\n{mta.log()[-2000:]}")
        assert not mta.held()
    finally:
        for child in children:
            child.stop()
        mta.stop()


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_pre_send_hold_keeps_an_unprecedented_post_from_being_expanded(broker, start_worker, tmp_path):
    """--pre-send-hold: the test message itself waits in the hold queue, unexpanded, until a moderator acts."""
    start_worker(broker.url, env={"STORMGUARD_WARMUP_EVENTS": "0", "STORMGUARD_NEW_LIST_MIN_MEMBERS": "500"})
    milter_port, admin_port = free_port(), free_port()
    mta = MilterPostfix(milter_port)
    children: list[_Child] = []
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        mta.start()
        milter = _Child(["-v", "milter", "--listen", f"inet:127.0.0.1:{milter_port}", "--broker", broker.url,
                         "--lists", str(mta.virtual), "--state-dir", str(tmp_path / "milter"),
                         "--postfix-config", str(mta.conf), "--admin-listen", f"127.0.0.1:{admin_port}",
                         "--pre-send-hold", "--pre-send-floor", "500", "--pre-send-wait", "20"],
                        tmp_path / "milter.log", env={"STORMGUARD_ADMIN_TOKEN": TOKEN})
        children.append(milter)
        wait_for(lambda: _port_open(milter_port) or not milter.alive(), 30, "the milter")
        assert milter.alive(), milter.log()
        mta.send("dave@example.test", ["team@lists.example.test"], "lunch?", "<small@example.test>")  # 2 members
        mta.send("alice@example.test", [LIST], "Test message", "<root@example.test>")
        held = wait_for(lambda: mta.held(), 60, f"the post in the hold queue\n{milter.log()}")
        (post,) = held.values()
        assert post["sender"] == "alice@example.test" and len(post["recipients"]) == MEMBERS  # held, not delivered
        root = _queue_id(mta, "<root@example.test>")
        assert f"{root}: milter-hold: END-OF-MESSAGE" in mta.log() and f"{root}: to=<user0" not in mta.log()
        wait_for(lambda: "to=<user1@members.example.test>, orig_to=<team@lists.example.test>" in mta.log(), 30,
                 "the small list's post")
        # its event went out before the hold (the worker decided on it), and only once
        ids = [json.loads(r.value)["message_id"] for r in read_topic(broker.bootstrap, "mail.events", timeout=3)]
        assert ids.count("<root@example.test>") == 1 and "<small@example.test>" in ids
        summary = http_json(admin + "/api/holds")[1]["held"]
        assert summary == [{"list": LIST, "thread": "<root@example.test>", "held": 1}]
        # nothing releases it by itself; a moderator does
        code, result = http_json(admin + "/api/holds/release", "POST",
                                 {"list": LIST, "thread": "<root@example.test>", "actor": "comms",
                                  "reason": "a real announcement"}, token=TOKEN)
        assert code == 200 and result["released"] == 1, result
        wait_for(lambda: f"{root}: to=<user0@members.example.test>" in mta.log(), 30, "the released post")
    finally:
        for child in children:
            child.stop()
        mta.stop()
