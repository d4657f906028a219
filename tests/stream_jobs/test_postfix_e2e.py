"""End to end with a real Postfix: events in through the log, a freeze bites at the SMTP door.

A private Postfix instance (Debian's package, its own ``config_directory``,
``queue_directory`` and ``data_directory`` under a temporary directory, smtpd
on a free 127.0.0.1 port, nothing but loopback) expands a 600-member virtual
alias list to a ``discard`` transport. ``stormguard ingest postfix-log
--follow`` turns its ``maillog_file`` into events on ``mail.events``; the
worker (``stormguard run``) freezes the list on the first reply-all to an
anomalous post; ``stormguard policy`` reads the freeze from
``stormguard.list-state`` and Postfix puts further mail to the list on hold,
while mail to other addresses keeps flowing. No mocks: a real broker, a real
worker, a real MTA, mail sent with smtplib.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from stream_jobs.kafka.broker import free_port
from tests.conftest import ROOT, STORMGUARD, read_topic, wait_for

pytestmark = [pytest.mark.live, pytest.mark.both_brokers]

POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None)
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"

LIST = "all@lists.example.test"
MEMBERS = 600


def _skip_reason() -> str | None:
    if POSTFIX is None or not os.path.exists(POSTQUEUE):
        return "Postfix binaries are absent (Debian package `postfix`; `make install` installs it)"
    if os.geteuid() != 0:
        return "starting a private Postfix instance needs root (its daemons drop to the postfix user)"
    return None


class PostfixInstance:
    """A throw-away Postfix: own config, queue and data directories; smtpd on 127.0.0.1:PORT only."""

    def __init__(self, policy_port: int):
        # not pytest's tmp_path: that is 0700 root-only, and Postfix's daemons run as `postfix`
        self.base = Path(tempfile.mkdtemp(prefix="stormguard-postfix-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.conf = self.base / "etc"
        self.port = free_port()
        self.maillog = self.base / "maillog"
        self.virtual = self.base / "virtual"
        self.policy_port = policy_port

    def write_config(self) -> None:
        for d in ("etc", "queue", "data"):
            (self.base / d).mkdir()
        shutil.chown(self.base / "data", "postfix")
        members = [f"user{i}@members.example.test" for i in range(MEMBERS)]
        lines = [f"{LIST}  {', '.join(members[:300])},", f"    {', '.join(members[300:])}",
                 "team@lists.example.test  user1@members.example.test, user2@members.example.test"]
        self.virtual.write_text("# lists of the test organisation\n" + "\n".join(lines) + "\n")
        (self.base / "header_checks").write_text("/^In-Reply-To:/ INFO\n/^Subject:/ INFO\n")
        b = self.base
        (self.conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {b}/queue
data_directory = {b}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.example.test
mydomain = example.test
myorigin = example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtputf8_enable = no
maillog_file = {self.maillog}
maillog_file_prefixes = {b}
virtual_alias_domains = lists.example.test
virtual_alias_maps = texthash:{self.virtual}
# every delivery is discarded (and logged): nothing leaves this machine
default_transport = discard:stormguard-test
relay_transport = discard:stormguard-test
local_transport = discard:stormguard-test
virtual_transport = discard:stormguard-test
header_checks = regexp:{b}/header_checks
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# as docs/postfix.md has it: the policy check comes before permit_mynetworks (internal senders
# start storms), and Postfix itself fails open (DUNNO) if the policy server is down
stormguard_policy = check_policy_service {{ inet:127.0.0.1:{self.policy_port}, timeout=10s, default_action=DUNNO }}
smtpd_recipient_restrictions = $stormguard_policy, permit_mynetworks, reject_unauth_destination
""")
        services = ["pickup unix n - n 60 1 pickup", "cleanup unix n - n - 0 cleanup",
                    "qmgr unix n - n 300 1 qmgr", "rewrite unix - - n - - trivial-rewrite",
                    "bounce unix - - n - 0 bounce", "defer unix - - n - 0 bounce", "trace unix - - n - 0 bounce",
                    "verify unix - - n - 1 verify", "flush unix n - n 1000? 0 flush",
                    "proxymap unix - - n - - proxymap", "proxywrite unix - - n - 1 proxymap",
                    "smtp unix - - n - - smtp", "relay unix - - n - - smtp", "showq unix n - n - - showq",
                    "error unix - - n - - error", "retry unix - - n - - error", "discard unix - - n - - discard",
                    "anvil unix - - n - 1 anvil", "scache unix - - n - 1 scache",
                    "postlog unix-dgram n - n - 1 postlogd"]
        (self.conf / "master.cf").write_text(f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
                                             + "\n".join(services) + "\n")

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.conf), *args], capture_output=True, text=True,
                              timeout=60, check=check)

    def start(self) -> "PostfixInstance":
        self.write_config()
        result = self.postfix("start", check=False)
        if result.returncode != 0:
            raise AssertionError(f"postfix start failed: {result.stdout}{result.stderr}\n{self.log()}")
        wait_for(lambda: _port_open(self.port), 30, f"Postfix smtpd on 127.0.0.1:{self.port}")
        return self

    def stop(self) -> None:
        if self.postfix("status", check=False).returncode == 0:
            self.postfix("stop", check=False)
            if self.postfix("status", check=False).returncode == 0:
                self.postfix("abort", check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def queue(self) -> list[dict]:
        out = subprocess.run([POSTQUEUE, "-c", str(self.conf), "-j"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def send(self, sender: str, to: list[str], subject: str, message_id: str, in_reply_to: str | None = None):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = sender, ", ".join(to), subject, message_id
        if in_reply_to:
            msg["In-Reply-To"] = msg["References"] = in_reply_to
        msg.set_content("Please remove me from this list.\n")
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
            refused = smtp.send_message(msg, from_addr=sender, to_addrs=to)
        assert refused == {}, refused


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _policy_answer(port: int, recipient: str) -> str:
    """One real policy-protocol request, as Postfix sends it at RCPT time."""
    request = (f"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
               f"client_address=127.0.0.1\nsender=probe@example.test\nrecipient={recipient}\n\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request.encode())
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode()


class _Child:
    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log_path = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(STORMGUARD + args, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                        **(env or {})})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_postfix_events_in_freeze_out_mail_to_the_frozen_list_is_held(broker, start_worker, tmp_path):
    # Test-sized policy: no warm-up, and a never-seen list of 600 counts as big (defaults: 100 events, 5,000).
    worker = start_worker(broker.url, env={"STORMGUARD_WARMUP_EVENTS": "0",
                                           "STORMGUARD_NEW_LIST_MIN_MEMBERS": "500"})
    policy_port = free_port()
    mta = PostfixInstance(policy_port)
    children: list[_Child] = []
    try:
        policy = _Child(["-v", "policy", "--listen", f"127.0.0.1:{policy_port}", "--broker", broker.url],
                        tmp_path / "policy.log")
        children.append(policy)
        wait_for(lambda: _port_open(policy_port) or not policy.alive(), 30, "the policy server")
        assert policy.alive(), policy.log()
        # a second policy server, reading the worker's HTTP API instead of the topic (not wired to Postfix)
        api_port = free_port()
        api_policy = _Child(["policy", "--listen", f"127.0.0.1:{api_port}", "--worker-url", worker.url,
                             "--action", "defer", "--cache-ttl", "0.5"], tmp_path / "policy-api.log")
        children.append(api_policy)
        wait_for(lambda: _port_open(api_port) or not api_policy.alive(), 30, "the worker-API policy server")
        assert api_policy.alive(), api_policy.log()

        mta.start()
        ingest = _Child(["-v", "ingest", "postfix-log", "--follow", str(mta.maillog), "--lists", str(mta.virtual),
                         "--broker", broker.url, "--emit-after", "2"], tmp_path / "ingest.log")
        children.append(ingest)

        def events() -> dict[str, dict]:
            return {e["message_id"]: e for e in
                    (json.loads(r.value) for r in read_topic(broker.bootstrap, "mail.events", timeout=3))}

        # 1. ordinary mail and a first post to the big list: events arrive through the log
        mta.send("dave@example.test", ["x@members.example.test"], "lunch?", "<flow1@example.test>")
        mta.send("alice@example.test", [LIST], "Test message", "<root@example.test>")
        seen = wait_for(lambda: (ev := events()) and {"<flow1@example.test>", "<root@example.test>"} <= set(ev) and ev,
                     60, f"the first events on mail.events\n{ingest.log()}")
        root = seen["<root@example.test>"]
        assert root["sender"] == "alice@example.test" and root["recipients"] == [LIST]
        assert root["lists"] == {LIST: MEMBERS} and root["delivered_count"] == MEMBERS
        assert root["subject"] == "Test message"
        assert seen["<flow1@example.test>"]["recipients"] == ["x@members.example.test"]
        assert _policy_answer(policy_port, LIST) == "action=DUNNO\n\n"

        # 2. the storm: a reply-all to that anomalous post; the worker freezes the list
        mta.send("bob@example.test", [LIST], "RE: Test message", "<reply1@example.test>",
                 in_reply_to="<root@example.test>")
        status = wait_for(lambda: (s := worker.get(f"/api/lists/{LIST}"))["frozen"] and s, 60,
                       f"the worker to freeze {LIST}\n{ingest.log()}\n{worker.tail()}")
        assert "anomalous" in status["reason"]
        reply1 = events()["<reply1@example.test>"]
        assert reply1["in_reply_to"] == "<root@example.test>" and reply1["lists"] == {LIST: MEMBERS}

        # 3. the freeze reaches the policy server through stormguard.list-state
        wait_for(lambda: _policy_answer(policy_port, LIST).startswith("action=HOLD "), 30,
              f"the policy server to see the freeze\n{policy.log()}")
        wait_for(lambda: _policy_answer(api_port, LIST).startswith("action=DEFER 4."), 30,
              f"the worker-API policy server to see the freeze\n{api_policy.log()}")
        assert _policy_answer(api_port, "x@members.example.test") == "action=DUNNO\n\n"

        # 4. further mail to the list lands in the hold queue; mail to other addresses flows
        mta.send("carol@example.test", [LIST], "RE: Test message", "<reply2@example.test>",
                 in_reply_to="<root@example.test>")
        mta.send("erin@example.test", ["y@members.example.test"], "minutes", "<flow2@example.test>")
        held = wait_for(lambda: [m for m in mta.queue() if m["queue_name"] == "hold"], 30,
                     f"a message in the hold queue\n{mta.log()[-3000:]}")
        assert len(held) == 1, held
        assert held[0]["sender"] == "carol@example.test"
        assert len(held[0]["recipients"]) == MEMBERS  # expanded, and not one of them delivered
        wait_for(lambda: "to=<y@members.example.test>, relay=none" in mta.log() and "status=sent" in mta.log(), 30,
              "the delivery of mail to a non-list address")
        flow2 = wait_for(lambda: events().get("<flow2@example.test>"), 30, "the event of mail that still flows")
        assert flow2["recipients"] == ["y@members.example.test"]
        assert not [m for m in mta.queue() if m["queue_name"] != "hold"]  # nothing stuck, nothing deferred
        assert "<reply2@example.test>" not in events()  # held mail is not a delivery
        log = mta.log()
        assert "NOQUEUE: hold: RCPT from localhost[127.0.0.1]: <all@lists.example.test>" in log
        assert ingest.alive() and policy.alive()
    finally:
        for child in children:
            child.stop()
        mta.stop()
