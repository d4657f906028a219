"""TLS and SASL for real: Apache Kafka with a SASL_SSL listener (SCRAM-SHA-512), certificates made in the test.

Every command that talks to Kafka is pointed at that listener with ``STORMGUARD_KAFKA_SSL_CAFILE`` and
``STORMGUARD_KAFKA_SASL_*`` and must work (the worker, ``deliver``, ``replay``, ``ingest postfix-log``,
``learn``, ``policy``); with a wrong password or a CA that did not sign the broker's certificate each must stop
with a clear error instead of hanging or retrying.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from stream_jobs.kafka.broker import free_port
from tests.conftest import ROOT, STORMGUARD, wait_for
from tests.scenarios import T0, background, lines, nhsmail_storm
from tests.stream_jobs.receivers import WebhookReceiver
from tests.stream_jobs.secure_kafka import start_secure_kafka

pytestmark = pytest.mark.live

HERE = Path(__file__).parent
SECRET = "whsec_" + base64.b64encode(b"stormguard-security-test-secret!").decode()
#: a stock broker refuses group sessions under 6 s (group.min.session.timeout.ms)
SESSION = {"STORMGUARD_SESSION_TIMEOUT": "6"}


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    kafka = start_secure_kafka(tmp_path_factory.mktemp("secure-kafka"))
    yield kafka
    kafka.broker.stop()


def read_topic(secure, topic: str, timeout: float = 10.0) -> list:
    """Every record of ``topic``, read over SASL_SSL (the test's own client)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=[secure.bootstrap], group_id=None, enable_auto_commit=False,
                             **secure.client_options())
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline and any(consumer.position(tp) < end[tp] for tp in tps):
            out += [r for rs in consumer.poll(timeout_ms=300).values() for r in rs]
        return out
    finally:
        consumer.close()


def stormguard(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(STORMGUARD + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def policy_answer(port: int, recipient: str) -> str:
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


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Child:
    """A long-running command (``policy``, ``deliver``) with its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict):
        self.log_path = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(STORMGUARD + args, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **env})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_every_command_works_over_sasl_ssl_scram(secure, start_worker, tmp_path):
    env = {**secure.env(), **SESSION, "STORMGUARD_WARMUP_EVENTS": "0", "STORMGUARD_LEARN_HISTORY": "false"}
    # the password from a file, as Docker and Kubernetes secrets give it
    (tmp_path / "sasl-password").write_text(env.pop("STORMGUARD_KAFKA_SASL_PASSWORD") + "\n")
    env["STORMGUARD_KAFKA_SASL_PASSWORD_FILE"] = str(tmp_path / "sasl-password")

    # ingest postfix-log: a Postfix log in, contract events out
    run = stormguard(["ingest", "postfix-log", str(HERE / "postfix_maillog_delivered.log"),
                      "--lists", str(HERE / "postfix_virtual_lists.txt"), "--broker", secure.url], env)
    assert run.returncode == 0, run.stderr
    ingested = {json.loads(r.value)["message_id"] for r in read_topic(secure, "mail.events")}
    assert "<root1@example.test>" in ingested, ingested

    # learn: list models from an archive older than what mail.events holds, written before the worker starts
    archive = tmp_path / "archive.jsonl"
    bulletins = [{"message_id": f"bul{k}", "timestamp": T0 - (30 - k) * 86400, "sender": "comms@nhs.net",
                  "recipients": ["bulletin@nhs.net"], "lists": {"bulletin@nhs.net": 5000}} for k in range(3)]
    archive.write_bytes(b"\n".join(lines(background(60, start=T0 - 40 * 86400) + bulletins)) + b"\n")
    run = stormguard(["learn", str(archive), "--broker", secure.url, "--no-progress"], env)
    assert run.returncode == 0 and "1 list model(s) written" in run.stderr, run.stderr

    # the worker, then replay: a storm scored and frozen over SASL_SSL
    worker = start_worker(secure.url, env=env)
    storm = tmp_path / "storm.jsonl"
    storm.write_bytes(b"\n".join(lines(background(120) + nhsmail_storm(T0 + 3000, replies=3))) + b"\n")
    run = stormguard(["replay", str(storm), "--broker", secure.url, "--no-progress"], env)
    assert run.returncode == 0, run.stderr
    wait_for(lambda: worker.get("/api/lists/all@nhs.net")["frozen"], 90, "the worker to freeze all@nhs.net")
    actions = [json.loads(r.value) for r in read_topic(secure, "stormguard.actions")]
    assert [a["message_id"] for a in actions if a["kind"] == "freeze"] == ["reply0"], actions

    children: list[Child] = []
    try:
        # policy: the freeze reaches the Postfix policy server through stormguard.list-state
        port = free_port()
        # (--ignore-until: the storm happened in 2016, so its freeze has long run out by the wall clock)
        policy = Child(["policy", "--listen", f"127.0.0.1:{port}", "--broker", secure.url, "--ignore-until"],
                       tmp_path / "policy.log",
                       env)
        children.append(policy)
        wait_for(lambda: port_open(port) or policy.proc.poll() is not None, 60, "the policy server")
        wait_for(lambda: policy.proc.poll() is None and policy_answer(port, "all@nhs.net").startswith("action=HOLD "),
                 60, f"the policy server to hold all@nhs.net\n{policy.log()}")

        # deliver: the freeze reaches a webhook receiver
        with WebhookReceiver(SECRET) as rx:
            deliver = Child(["deliver", "--broker", secure.url, "--web-port", "0"], tmp_path / "deliver.log",
                            {**env, "STORMGUARD_WEBHOOK_URLS": rx.hook_url, "STORMGUARD_WEBHOOK_SECRET": SECRET,
                             "STORMGUARD_DELIVER_START": "earliest"})
            children.append(deliver)
            got = wait_for(lambda: [b for b in list(rx.by_id.values()) if b["status"] == "firing" and
                                    b["alerts"][0]["labels"].get("list") == "all@nhs.net"]
                           or deliver.proc.poll() is not None, 90, "the freeze at the webhook receiver")
            assert deliver.proc.poll() is None, deliver.log()
            assert got
    finally:
        for child in children:
            child.stop()


@pytest.mark.parametrize("fault", ["wrong password", "untrusted certificate"])
def test_a_refused_password_or_certificate_is_a_clear_error_at_once(secure, tmp_path, fault):
    env = {**SESSION, **(secure.env(password="not-the-password") if fault == "wrong password"
                         else secure.env(ca=secure.untrusted_ca))}
    said = ("refused SASL SCRAM-SHA-512 for user 'stormguard'" if fault == "wrong password"
            else "presented a certificate this process does not trust")
    events = tmp_path / "one.jsonl"
    events.write_bytes(lines(background(1))[0] + b"\n")
    commands = {
        "replay": ["replay", str(events), "--no-progress"],
        "ingest": ["ingest", "postfix-log", str(HERE / "postfix_maillog_delivered.log"),
                   "--lists", str(HERE / "postfix_virtual_lists.txt")],
        "policy": ["policy", "--listen", f"127.0.0.1:{free_port()}"],
        "deliver": ["deliver", "--web-port", "0"],
        "run": ["run", "--web-port", str(free_port())],
        "learn": ["learn", str(events), "--no-progress"],
    }
    for name, args in commands.items():
        started = time.monotonic()
        try:
            run = stormguard(args, {**env, "STORMGUARD_DATA_DIR": str(tmp_path / "data"),
                                    "STORMGUARD_WEBHOOK_URLS": "http://127.0.0.1:9/"}, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"stormguard {name} with a {fault} still ran after 60 s")
        took = time.monotonic() - started
        assert run.returncode != 0, (name, run.stderr)
        assert said in run.stderr, (name, run.stderr)
        assert "Traceback" not in run.stderr, (name, run.stderr)
        print(f"{fault}: stormguard {name} stopped in {took:.1f} s (exit {run.returncode})")
